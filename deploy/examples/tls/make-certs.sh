#!/bin/sh
# Makes what a TLS + token deployment of sonde needs (docs/security.md, "Security model"):
# a CA, the aggregator's server certificate and one client certificate per agent, each
# with its key, in DIR. These are exactly the openssl commands of docs/security.md (OpenSSL 3, as in
# Debian 12).
#
#   sh make-certs.sh DIR SAN [AGENT_ID...]
#
#   DIR       where the files go (created 0700). Keep ca.key there, off the aggregator and
#             the agents: whoever holds it can make certificates your fleet trusts.
#   SAN       every name and address agents use to reach the aggregator, in openssl's
#             subjectAltName syntax: "DNS:aggregator.example.com,IP:192.0.2.10"
#   AGENT_ID  one client certificate (mTLS) per agent id, as in the agents' `agent.id`
#
# Files that already exist are kept: run it again with a new agent id to add that
# agent's certificate under the same CA. Everything is made 0600 (umask 077).
#
# Makes, in DIR:
#   ca.key, ca.pem                   the CA (ca.pem goes to the aggregator and every agent)
#   aggregator.key, aggregator.pem   the aggregator's key and certificate (fleet.tls)
#   AGENT_ID.key, AGENT_ID.pem       an agent's key and client certificate (tls_config)
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: sh $0 DIR SAN [AGENT_ID...]   e.g. sh $0 ./pki DNS:aggregator.example.com edge-eu-1" >&2
    exit 2
fi
DIR=$1
SAN=$2
shift 2
case "$SAN" in
    DNS:* | IP:*) ;;
    *)
        echo "SAN must be openssl's subjectAltName syntax, like DNS:aggregator.example.com,IP:192.0.2.10; got: $SAN" >&2
        exit 2
        ;;
esac

umask 077
mkdir -p "$DIR"

# 1. The CA: a key, and a self-signed certificate valid 10 years that may sign only
#    certificates.
if [ ! -e "$DIR/ca.key" ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/ca.key"
    openssl req -new -x509 -config /dev/null -key "$DIR/ca.key" -days 3650 \
        -subj "/CN=sonde fleet CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$DIR/ca.pem"
fi

# 2. The aggregator's server certificate, for every name agents dial (SAN), valid 825 days.
if [ ! -e "$DIR/aggregator.key" ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/aggregator.key"
    openssl req -new -x509 -config /dev/null -key "$DIR/aggregator.key" -days 825 \
        -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
        -subj "/CN=sonde aggregator" \
        -addext "subjectAltName=$SAN" \
        -addext "basicConstraints=critical,CA:FALSE" \
        -addext "keyUsage=critical,digitalSignature" \
        -addext "extendedKeyUsage=serverAuth" \
        -out "$DIR/aggregator.pem"
fi
openssl verify -CAfile "$DIR/ca.pem" -purpose sslserver "$DIR/aggregator.pem"
openssl x509 -in "$DIR/aggregator.pem" -noout -ext subjectAltName

# 3. One client certificate per agent (for mTLS: fleet.tls.client_ca_file), valid 825 days.
for AGENT in "$@"; do
    if [ ! -e "$DIR/$AGENT.key" ]; then
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$DIR/$AGENT.key"
        openssl req -new -x509 -config /dev/null -key "$DIR/$AGENT.key" -days 825 \
            -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
            -subj "/CN=$AGENT" \
            -addext "basicConstraints=critical,CA:FALSE" \
            -addext "keyUsage=critical,digitalSignature" \
            -addext "extendedKeyUsage=clientAuth" \
            -out "$DIR/$AGENT.pem"
    fi
    openssl verify -CAfile "$DIR/ca.pem" -purpose sslclient "$DIR/$AGENT.pem"
done
