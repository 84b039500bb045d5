/* l4relay: the least a proxy can do, as a floor to measure routers against.
 *
 * A TCP relay with no HTTP in it: each accepted client connection gets its own connection
 * to the next upstream (round robin, per connection), and bytes are copied both ways as they
 * arrive: one read() and one write() per chunk, nothing parsed, nothing buffered beyond a
 * short write. One epoll loop per thread, each thread with its own SO_REUSEPORT listener, as
 * nginx's workers and ringrouter's shards.
 *
 * Whatever a router does on top (parse, route, pool, count), its CPU per request cannot go
 * below this relay's on the same machine and load: what this costs is the kernel's, per
 * relayed chunk (loopback TCP, wake-ups, epoll).
 *
 *   gcc -O2 -pthread -o l4relay l4relay.c
 *   ./l4relay PORT THREADS HOST:PORT [HOST:PORT ...]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_UP 64
#define BUF 65536

static struct sockaddr_in ups[MAX_UP];
static int n_ups;
static int port;

/* One direction of a relayed pair: bytes read from `fd` go to `peer->fd`. */
struct side {
    int fd;
    struct side *peer;
    char *pending; /* bytes a short write left for `fd`, or NULL */
    size_t pending_len, pending_off;
    int closed;
};

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Closes both sides; the pair is freed after the current batch of events, which may still
 * name its other side. */
static __thread struct side *doomed[512];
static __thread int n_doomed;

static void close_pair(int ep, struct side *s) {
    struct side *p = s->peer;
    s->closed = p->closed = 1;
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    epoll_ctl(ep, EPOLL_CTL_DEL, p->fd, NULL);
    close(s->fd);
    close(p->fd);
    free(s->pending);
    free(p->pending);
    s->pending = p->pending = NULL;
    doomed[n_doomed++] = s < p ? s : p; /* the two sides are one allocation */
}

/* What `s` waits for: writability while it has bytes left to write, input while its peer
 * can take more (a peer with bytes left pauses the reading that would add to them). */
static void arm(int ep, struct side *s) {
    uint32_t events = (s->pending ? EPOLLOUT : 0) | (s->peer->pending ? 0 : EPOLLIN);
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
}

/* Writes to `to` what it can; keeps the rest. Returns -1 if `to` is gone. */
static int send_to(int ep, struct side *to, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(to->fd, buf + off, len - off);
        if (w > 0) {
            off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            to->pending = malloc(len - off);
            memcpy(to->pending, buf + off, len - off);
            to->pending_len = len - off;
            to->pending_off = 0;
            arm(ep, to);
            arm(ep, to->peer);
            return 0;
        } else {
            return -1;
        }
    }
    return 0;
}

static void *worker(void *arg) {
    (void)arg;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096))
        die("listen");
    int ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    static __thread char buf[BUF];
    unsigned next_up = 0;
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        n_doomed = 0;
        for (int i = 0; i < n; i++) {
            struct side *s = evs[i].data.ptr;
            if (!s) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int u = socket(AF_INET, SOCK_STREAM, 0); /* blocking connect: loopback */
                    struct sockaddr_in *to = &ups[next_up++ % n_ups];
                    if (u < 0 || connect(u, (struct sockaddr *)to, sizeof *to)) {
                        close(c);
                        if (u >= 0)
                            close(u);
                        continue;
                    }
                    fcntl(u, F_SETFL, O_NONBLOCK);
                    nodelay(c);
                    nodelay(u);
                    struct side *pair = calloc(2, sizeof *pair);
                    pair[0] = (struct side){.fd = c, .peer = &pair[1]};
                    pair[1] = (struct side){.fd = u, .peer = &pair[0]};
                    struct epoll_event e0 = {.events = EPOLLIN, .data.ptr = &pair[0]};
                    struct epoll_event e1 = {.events = EPOLLIN, .data.ptr = &pair[1]};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &e0);
                    epoll_ctl(ep, EPOLL_CTL_ADD, u, &e1);
                }
                continue;
            }
            if (s->closed)
                continue;
            if ((evs[i].events & EPOLLOUT) && s->pending) {
                ssize_t w = write(s->fd, s->pending + s->pending_off,
                                  s->pending_len - s->pending_off);
                if (w < 0 && errno != EAGAIN) {
                    close_pair(ep, s);
                    continue;
                }
                if (w > 0)
                    s->pending_off += (size_t)w;
                if (s->pending_off == s->pending_len) {
                    free(s->pending);
                    s->pending = NULL;
                    arm(ep, s);
                    arm(ep, s->peer);
                }
                continue;
            }
            if (!(evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                continue;
            /* Paused (its peer has bytes left), yet told of a hang-up or an error, which epoll
             * reports whatever the mask: the pair is over. */
            if (s->peer->pending) {
                if (evs[i].events & (EPOLLHUP | EPOLLERR))
                    close_pair(ep, s);
                continue; /* else an input reported before the pause: read it later */
            }
            ssize_t r = read(s->fd, buf, BUF);
            if (r < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            if (r <= 0 || send_to(ep, s->peer, buf, (size_t)r) < 0) {
                close_pair(ep, s);
            }
        }
        for (int i = 0; i < n_doomed; i++)
            free(doomed[i]);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PORT THREADS HOST:PORT [HOST:PORT ...]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    port = atoi(argv[1]);
    int threads = atoi(argv[2]);
    for (int i = 3; i < argc && n_ups < MAX_UP; i++) {
        char host[64];
        int p;
        if (sscanf(argv[i], "%63[^:]:%d", host, &p) != 2) {
            fprintf(stderr, "bad upstream %s (want HOST:PORT)\n", argv[i]);
            return 2;
        }
        ups[n_ups].sin_family = AF_INET;
        ups[n_ups].sin_port = htons(p);
        if (inet_pton(AF_INET, host, &ups[n_ups].sin_addr) != 1) {
            fprintf(stderr, "bad upstream host %s\n", host);
            return 2;
        }
        n_ups++;
    }
    pthread_t t[64];
    for (int i = 0; i < threads && i < 64; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    fprintf(stderr, "l4relay listening on 127.0.0.1:%d, %d thread(s), %d upstream(s)\n", port,
            threads, n_ups);
    for (int i = 0; i < threads && i < 64; i++)
        pthread_join(t[i], NULL);
    return 0;
}
