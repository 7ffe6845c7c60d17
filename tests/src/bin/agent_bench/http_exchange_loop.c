/* The floor of a fresh-connection HTTP probe: per target, socket() + blocking connect()
 * + write() of a GET + read() until the server closes + close(), paced like the agent.
 *
 * Usage: http-exchange-loop IPV4 PORT TARGETS RATE WARMUP_SECONDS SECONDS
 *
 * Exchange n asks for `/?t=(n mod TARGETS)` (the URLs of agent-bench's job) and starts at
 * n / RATE seconds after the loop began, so it runs at the agent's probe rate (targets ÷
 * interval) rather than flat out: at a low rate the caches are cold at every exchange, as
 * they are for the agent, and that costs more CPU per exchange than a tight loop does. An
 * exchange that falls behind its slot starts at once; none is skipped.
 *
 * It loops for WARMUP_SECONDS, prints "ready", and waits for a line on stdin (the bench
 * reads this process's CPU then); loops for SECONDS, prints "done N" (N exchanges), and
 * waits for stdin to close (the bench reads the CPU again) before it exits. Any failed
 * exchange (refused, reset, short write, an answer that is not a 200) ends the program
 * with an error that names the target's URL: the floor is only a floor if every exchange
 * did the whole work. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in addr;
static long targets;
static double rate;
static long next_target; /* carries on from the warm-up into the measured phase */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_until(double when) {
    struct timespec t;
    t.tv_sec = (time_t)when;
    t.tv_nsec = (long)((when - (double)t.tv_sec) * 1e9);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

static void fail(long target, const char *what, const char *why) {
    fprintf(stderr, "http-exchange-loop: GET http://%s:%d/?t=%ld: %s: %s\n",
            inet_ntoa(addr.sin_addr), ntohs(addr.sin_port), target, what, why);
    exit(1);
}

/* One exchange with a fresh connection, as an HTTP probe without keep-alive does it. */
static void exchange(long target) {
    char request[256];
    int length = snprintf(request, sizeof request,
                          "GET /?t=%ld HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n",
                          target, inet_ntoa(addr.sin_addr), ntohs(addr.sin_port));
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        fail(target, "socket", strerror(errno));
    }
    if (connect(fd, (const struct sockaddr *)&addr, sizeof addr) != 0) {
        fail(target, "connect", strerror(errno));
    }
    ssize_t written = write(fd, request, (size_t)length);
    if (written != length) {
        fail(target, "write", written < 0 ? strerror(errno) : "short write");
    }
    /* The status line is checked on the first bytes; the rest is read and dropped. */
    char status[16];
    size_t status_len = 0;
    char buffer[4096];
    for (;;) {
        ssize_t n = read(fd, buffer, sizeof buffer);
        if (n < 0) {
            fail(target, "read", strerror(errno));
        }
        if (n == 0) {
            break;
        }
        size_t take = sizeof status - status_len < (size_t)n ? sizeof status - status_len
                                                             : (size_t)n;
        memcpy(status + status_len, buffer, take);
        status_len += take;
    }
    close(fd);
    if (status_len < 13 || memcmp(status, "HTTP/1.1 200 ", 13) != 0) {
        fail(target, "answer", status_len == 0 ? "closed without an answer" : "not a 200");
    }
}

/* Runs paced exchanges for `seconds`; the number of exchanges. */
static long loop(double seconds) {
    double start = now();
    double until = start + seconds;
    long n = 0;
    for (;;) {
        double slot = start + (double)n / rate;
        if (slot >= until) {
            break;
        }
        sleep_until(slot);
        exchange(next_target);
        next_target = (next_target + 1) % targets;
        n++;
    }
    /* The last slot's exchange may end past `until`; the phase ends with it. */
    return n;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr,
                "usage: http-exchange-loop IPV4 PORT TARGETS RATE WARMUP_SECONDS SECONDS\n");
        return 2;
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "http-exchange-loop: %s is not an IPv4 address\n", argv[1]);
        return 2;
    }
    targets = atol(argv[3]);
    rate = atof(argv[4]);
    if (targets < 1 || !(rate > 0)) {
        fprintf(stderr, "http-exchange-loop: TARGETS (%s) and RATE (%s) must be positive\n",
                argv[3], argv[4]);
        return 2;
    }
    char line[64];
    loop(atof(argv[5]));
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) {
        return 1;
    }
    long n = loop(atof(argv[6]));
    printf("done %ld\n", n);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
    }
    return 0;
}
