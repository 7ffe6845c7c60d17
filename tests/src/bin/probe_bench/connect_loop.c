/* The floor of a TCP probe: connect() then close(), in a loop, to one address.
 *
 * Usage: connect-loop IPV4 PORT WARMUP_SECONDS SECONDS
 *
 * It loops for WARMUP_SECONDS, prints "ready", and waits for a line on stdin (the bench
 * reads this process's CPU then); loops for SECONDS, prints "done N" (N iterations),
 * and waits for stdin to close (the bench reads the CPU again) before it exits. Each
 * connection is a blocking connect() that completes the handshake, then close(). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Connects and closes until `seconds` have passed; the number of connections. */
static long loop(const struct sockaddr_in *addr, double seconds) {
    double until = now() + seconds;
    long n = 0;
    while (now() < until) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            fprintf(stderr, "connect-loop: socket: %s\n", strerror(errno));
            exit(1);
        }
        if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) != 0) {
            fprintf(stderr, "connect-loop: connect to %s:%d: %s\n",
                    inet_ntoa(addr->sin_addr), ntohs(addr->sin_port), strerror(errno));
            exit(1);
        }
        close(fd);
        n++;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: connect-loop IPV4 PORT WARMUP_SECONDS SECONDS\n");
        return 2;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "connect-loop: %s is not an IPv4 address\n", argv[1]);
        return 2;
    }
    char line[64];
    loop(&addr, atof(argv[3]));
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) {
        return 1;
    }
    long n = loop(&addr, atof(argv[4]));
    printf("done %ld\n", n);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}
