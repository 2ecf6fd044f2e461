/*
 * A small DTLS 1.2 client on wolfSSL (built with --enable-dtlscid) for the connection ID
 * interop tests and figures (tests/interop.rs, scripts/cid_bench.sh, BENCHMARKS.md): an independent RFC 9146
 * implementation that changes its UDP socket, so its source port, under an established
 * association.
 *
 * It runs -m associations at once, non-blocking, in one thread. Each does a DTLS 1.2 handshake
 * (no certificate verification, or PSK), asking for a connection ID if -i or -c says so, then
 * sends -n lines one at a time, each echoed by the server before the next goes. Every -k lines
 * it opens a new UDP socket (a new port), closes the old one and carries on with the same
 * association over the new one (wolfSSL_set_fd): the server sees the association's records
 * come from a new address and must send the echo there, which is the only place it can arrive,
 * the old socket being closed. A line whose echo does not come within -t ms is sent again (a new record), at most
 * -R times. Then close_notify, and with -r a second handshake resuming the session, the same
 * lines and moves again.
 *
 * Output, one line each (a = association, l = line number, from 1):
 *   connected a=0 resumed=0 cid=1 tx=<hex> rx=<hex> port=<p> cipher=<name>
 *   moved a=0 from=<p> to=<q>
 *   echo a=0 l=3 port=<q> tries=1 text=<line>     (not with -q)
 *   closed a=0
 *   summary associations=.. lines=.. echoed=.. lost=.. retransmits=.. moves=.. survived=..
 *           survived_first_try=.. cpu_us=.. echo_wall_ms=.. echo_cpu_us=..
 * "survived": the first line after a move came back (to the new socket); "first try": without
 * being sent again. echo_cpu_us is this process's CPU between the last handshake's end and the
 * last echo (-g: from the "go" line on).
 *
 * Options: -h host (127.0.0.1) -p port -m associations (1) -n lines (3) -k every (0: never
 * move) -i (ask for a CID, an empty one for the server's records) -c HEX (ask for a CID, this one
 * in the server's records) -l cipher list -s IDENTITY:HEXKEY (PSK) -r (resume once) -t ms (1000)
 * -R retries (5) -g (print "ready" once every handshake is done, wait for a line on stdin) -q
 * (no echo lines) -T seconds (a handshake's limit, 10) -z bytes (line length, padded; 0: as is).
 */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef WOLFSSL_DTLS_CID
#error "wolfSSL must be built with --enable-dtlscid"
#endif

enum phase { HANDSHAKE, ECHO, CLOSING, DONE };

struct assoc {
    int id;
    WOLFSSL *ssl;
    int fd;
    int port;
    enum phase phase;
    int round; /* 0: first connection, 1: the resumption */
    int line;  /* the line waiting for its echo (1-based) */
    int tries;
    double deadline; /* handshake: the whole handshake; echo: the next retransmission */
    double timer;    /* handshake: wolfSSL's retransmission timer */
    int moved;       /* the line in flight is the first after a move */
    char text[2048];
    int text_len;
    WOLFSSL_SESSION *session;
};

static const char *host = "127.0.0.1";
static int port = 0, lines = 3, every = 0, use_cid = 0, resume = 0, retries = 5, gate = 0,
           quiet = 0, line_size = 0;
static double echo_timeout = 1.0, hs_limit = 10.0;
static unsigned char own_cid[64];
static int own_cid_len = 0;
static const char *psk_identity = NULL;
static unsigned char psk_key[64];
static int psk_key_len = 0;
static struct sockaddr_in server;

static long echoed = 0, lost = 0, retransmits = 0, moves = 0, survived = 0, survived_first = 0;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long cpu_us(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000L + ru.ru_utime.tv_usec +
           ru.ru_stime.tv_usec;
}

static void die(const char *what)
{
    fprintf(stderr, "cid_client: %s\n", what);
    exit(2);
}

static int hex(const char *s, unsigned char *out, int max)
{
    int n = 0;
    while (s[0] && s[1]) {
        unsigned int b;
        if (n == max || sscanf(s, "%2x", &b) != 1)
            return -1;
        out[n++] = (unsigned char)b;
        s += 2;
    }
    return *s ? -1 : n;
}

static void print_hex(const unsigned char *b, unsigned int n)
{
    for (unsigned int i = 0; i < n; i++)
        printf("%02x", b[i]);
}

static unsigned int psk_cb(WOLFSSL *ssl, const char *hint, char *identity, unsigned int id_max,
                           unsigned char *key, unsigned int key_max)
{
    (void)ssl;
    (void)hint;
    if (strlen(psk_identity) >= id_max || (unsigned int)psk_key_len > key_max)
        return 0;
    strcpy(identity, psk_identity);
    memcpy(key, psk_key, psk_key_len);
    return (unsigned int)psk_key_len;
}

/* A new non-blocking UDP socket on 127.0.0.1, a port of its own; returns the fd, sets *p. */
static int new_socket(int *p)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in local = {.sin_family = AF_INET};
    local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&local, sizeof local) != 0)
        die("bind");
    socklen_t len = sizeof local;
    getsockname(fd, (struct sockaddr *)&local, &len);
    *p = ntohs(local.sin_port);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void start(struct assoc *a, WOLFSSL_CTX *ctx)
{
    a->ssl = wolfSSL_new(ctx);
    if (!a->ssl)
        die("wolfSSL_new");
    if (wolfSSL_dtls_set_peer(a->ssl, &server, sizeof server) != WOLFSSL_SUCCESS)
        die("wolfSSL_dtls_set_peer");
    a->fd = new_socket(&a->port);
    wolfSSL_set_fd(a->ssl, a->fd);
    wolfSSL_dtls_set_using_nonblock(a->ssl, 1);
    if (use_cid) {
        if (wolfSSL_dtls_cid_use(a->ssl) != WOLFSSL_SUCCESS)
            die("wolfSSL_dtls_cid_use");
        if (wolfSSL_dtls_cid_set(a->ssl, own_cid, (unsigned int)own_cid_len) != WOLFSSL_SUCCESS)
            die("wolfSSL_dtls_cid_set");
    }
    if (a->session && wolfSSL_set_session(a->ssl, a->session) != WOLFSSL_SUCCESS)
        die("wolfSSL_set_session");
    a->phase = HANDSHAKE;
    a->deadline = now() + hs_limit;
    a->timer = now() + wolfSSL_dtls_get_current_timeout(a->ssl);
    a->line = 0;
}

/* Sends line a->line (again, if tries > 0). */
static void send_line(struct assoc *a)
{
    if (a->tries == 0) {
        a->text_len = snprintf(a->text, sizeof a->text, "cid a%d r%d l%d", a->id, a->round,
                               a->line);
        while (a->text_len < line_size && a->text_len < (int)sizeof a->text - 1)
            a->text[a->text_len++] = '.';
        a->text[a->text_len] = 0;
    } else {
        retransmits++;
    }
    a->tries++;
    int n = wolfSSL_write(a->ssl, a->text, a->text_len);
    if (n != a->text_len) {
        int err = wolfSSL_get_error(a->ssl, n);
        if (err != WOLFSSL_ERROR_WANT_WRITE && err != WOLFSSL_ERROR_WANT_READ) {
            fprintf(stderr, "cid_client: a=%d write: %s\n", a->id,
                    wolfSSL_ERR_reason_error_string(err));
            exit(1);
        }
    }
    a->deadline = now() + echo_timeout;
}

static void close_assoc(struct assoc *a)
{
    if (resume && a->round == 0)
        a->session = wolfSSL_get1_session(a->ssl);
    wolfSSL_shutdown(a->ssl);
    a->phase = CLOSING;
    a->deadline = now() + 1.0;
}

static void finish(struct assoc *a, WOLFSSL_CTX *ctx)
{
    printf("closed a=%d\n", a->id);
    wolfSSL_free(a->ssl);
    close(a->fd);
    a->ssl = NULL;
    if (resume && a->round == 0) {
        a->round = 1;
        start(a, ctx);
    } else {
        if (a->session)
            wolfSSL_SESSION_free(a->session);
        a->session = NULL;
        a->phase = DONE;
    }
}

/* The next line, after a move every `every` lines; or close_notify after the last. */
static void next_line(struct assoc *a)
{
    if (a->line == lines) {
        close_assoc(a);
        return;
    }
    a->line++;
    a->tries = 0;
    a->moved = 0;
    if (every > 0 && a->line > 1 && (a->line - 1) % every == 0) {
        /* The new socket is bound before the old one is closed, so its port is another: a
         * port just freed may be handed out again, and the server would see no move. */
        int from = a->port, old = a->fd;
        a->fd = new_socket(&a->port);
        close(old);
        if (wolfSSL_set_fd(a->ssl, a->fd) != WOLFSSL_SUCCESS)
            die("wolfSSL_set_fd");
        moves++;
        a->moved = 1;
        printf("moved a=%d from=%d to=%d\n", a->id, from, a->port);
    }
    send_line(a);
}

static void connected(struct assoc *a)
{
    unsigned char tx[256], rx[256];
    unsigned int txn = 0, rxn = 0;
    int on = wolfSSL_dtls_cid_is_enabled(a->ssl);
    if (on) {
        wolfSSL_dtls_cid_get_tx_size(a->ssl, &txn);
        wolfSSL_dtls_cid_get_rx_size(a->ssl, &rxn);
        if (txn > 0)
            wolfSSL_dtls_cid_get_tx(a->ssl, tx, sizeof tx);
        if (rxn > 0)
            wolfSSL_dtls_cid_get_rx(a->ssl, rx, sizeof rx);
    }
    printf("connected a=%d resumed=%d cid=%d tx=", a->id, wolfSSL_session_reused(a->ssl), on);
    print_hex(tx, txn);
    printf(" rx=");
    print_hex(rx, rxn);
    printf(" port=%d cipher=%s\n", a->port, wolfSSL_get_cipher(a->ssl));
    a->phase = ECHO;
    a->deadline = now() + 3600; /* until its first line goes */
}

/* Runs association a after its socket became readable or a deadline passed. */
static void step(struct assoc *a, WOLFSSL_CTX *ctx, int ready, int gated)
{
    char buf[4096];
    double t = now();
    switch (a->phase) {
    case HANDSHAKE: {
        if (!ready && t >= a->timer) {
            if (wolfSSL_dtls_got_timeout(a->ssl) != WOLFSSL_SUCCESS)
                die("a handshake retransmission failed");
            a->timer = t + wolfSSL_dtls_get_current_timeout(a->ssl);
        }
        if (t >= a->deadline) {
            fprintf(stderr, "cid_client: a=%d: no handshake within %.0f s\n", a->id, hs_limit);
            exit(1);
        }
        int r = wolfSSL_connect(a->ssl);
        if (r == WOLFSSL_SUCCESS) {
            connected(a);
        } else {
            int err = wolfSSL_get_error(a->ssl, r);
            if (err != WOLFSSL_ERROR_WANT_READ && err != WOLFSSL_ERROR_WANT_WRITE) {
                char msg[256];
                wolfSSL_ERR_error_string_n(err, msg, sizeof msg);
                fprintf(stderr, "cid_client: a=%d handshake: %d %s\n", a->id, err, msg);
                exit(1);
            }
            if (ready)
                a->timer = now() + wolfSSL_dtls_get_current_timeout(a->ssl);
        }
        break;
    }
    case ECHO:
        if (a->line == 0) {
            if (!gated)
                next_line(a);
            break;
        }
        for (;;) {
            int n = wolfSSL_read(a->ssl, buf, sizeof buf - 1);
            if (n <= 0) {
                int err = wolfSSL_get_error(a->ssl, n);
                if (err == WOLFSSL_ERROR_WANT_READ || err == WOLFSSL_ERROR_WANT_WRITE)
                    break;
                fprintf(stderr, "cid_client: a=%d read: %d %s\n", a->id, err,
                        wolfSSL_ERR_reason_error_string(err));
                exit(1);
            }
            buf[n] = 0;
            if (n != a->text_len || memcmp(buf, a->text, n) != 0)
                continue; /* the echo of a line sent again, already counted */
            echoed++;
            if (a->moved) {
                survived++;
                survived_first += a->tries == 1;
            }
            if (!quiet)
                printf("echo a=%d l=%d port=%d tries=%d text=%s\n", a->id, a->line, a->port,
                       a->tries, buf);
            next_line(a);
            if (a->phase != ECHO)
                return;
        }
        if (now() >= a->deadline) {
            if (a->tries > retries) {
                lost++;
                fprintf(stderr, "cid_client: a=%d l=%d: no echo after %d tries\n", a->id,
                        a->line, a->tries);
                next_line(a);
            } else {
                send_line(a);
            }
        }
        break;
    case CLOSING: {
        /* The server's close_notify, for a bidirectional shutdown; not waited for past 1 s. */
        int r = wolfSSL_shutdown(a->ssl);
        if (r == WOLFSSL_SUCCESS || now() >= a->deadline)
            finish(a, ctx);
        break;
    }
    case DONE:
        break;
    }
}

int main(int argc, char **argv)
{
    int associations = 1, opt;
    const char *ciphers = NULL;
    while ((opt = getopt(argc, argv, "h:p:m:n:k:ic:l:s:rt:R:gqT:z:")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'm': associations = atoi(optarg); break;
        case 'n': lines = atoi(optarg); break;
        case 'k': every = atoi(optarg); break;
        case 'i': use_cid = 1; break;
        case 'c':
            use_cid = 1;
            own_cid_len = hex(optarg, own_cid, sizeof own_cid);
            if (own_cid_len < 0)
                die("-c: hex, at most 64 bytes");
            break;
        case 'l': ciphers = optarg; break;
        case 's': {
            char *colon = strchr(optarg, ':');
            if (!colon)
                die("-s IDENTITY:HEXKEY");
            *colon = 0;
            psk_identity = optarg;
            psk_key_len = hex(colon + 1, psk_key, sizeof psk_key);
            if (psk_key_len <= 0)
                die("-s: the key in hex");
            break;
        }
        case 'r': resume = 1; break;
        case 't': echo_timeout = atoi(optarg) / 1000.0; break;
        case 'R': retries = atoi(optarg); break;
        case 'g': gate = 1; break;
        case 'q': quiet = 1; break;
        case 'T': hs_limit = atof(optarg); break;
        case 'z': line_size = atoi(optarg); break;
        default: die("bad option (see the source's header)");
        }
    }
    if (port <= 0 || associations <= 0 || associations > 1024)
        die("-p PORT required; -m 1..1024");
    setvbuf(stdout, NULL, _IOLBF, 0);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &server.sin_addr) != 1)
        die("-h: an IPv4 address");

    wolfSSL_Init();
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
    if (!ctx)
        die("wolfSSL_CTX_new");
    wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_NONE, NULL);
    if (ciphers && wolfSSL_CTX_set_cipher_list(ctx, ciphers) != WOLFSSL_SUCCESS)
        die("wolfSSL_CTX_set_cipher_list");
    if (psk_identity)
        wolfSSL_CTX_set_psk_client_callback(ctx, psk_cb);

    struct assoc *as = calloc((size_t)associations, sizeof *as);
    struct pollfd *pfds = calloc((size_t)associations, sizeof *pfds);
    for (int i = 0; i < associations; i++) {
        as[i].id = i;
        start(&as[i], ctx);
        step(&as[i], ctx, 0, 1);
    }

    int gated = gate;
    int all_connected = 0;
    double echo_start = 0, echo_end = 0;
    long echo_cpu0 = 0, echo_cpu1 = 0;
    for (;;) {
        int done = 1, handshaking = 0;
        double next = now() + 1.0;
        for (int i = 0; i < associations; i++) {
            struct assoc *a = &as[i];
            pfds[i].fd = a->phase == DONE ? -1 : a->fd;
            pfds[i].events = POLLIN;
            pfds[i].revents = 0;
            if (a->phase != DONE)
                done = 0;
            if (a->phase == HANDSHAKE) {
                handshaking = 1;
                if (a->timer < next)
                    next = a->timer;
            }
            if (a->phase != DONE && a->deadline < next)
                next = a->deadline;
        }
        if (done)
            break;
        if (!handshaking && !all_connected) {
            all_connected = 1;
            if (gate) {
                printf("ready\n");
                char go[64];
                if (!fgets(go, sizeof go, stdin))
                    die("no go line on stdin");
                gated = 0;
            }
            echo_start = now();
            echo_cpu0 = cpu_us();
            for (int i = 0; i < associations; i++)
                if (as[i].phase == ECHO && as[i].line == 0)
                    step(&as[i], ctx, 0, 0);
            continue;
        }
        int wait_ms = (int)((next - now()) * 1000) + 1;
        if (wait_ms < 0)
            wait_ms = 0;
        if (poll(pfds, (nfds_t)associations, wait_ms) < 0 && errno != EINTR)
            die("poll");
        double t = now();
        for (int i = 0; i < associations; i++) {
            struct assoc *a = &as[i];
            if (a->phase == DONE)
                continue;
            int ready = (pfds[i].revents & POLLIN) != 0;
            if (ready || t >= a->deadline || (a->phase == HANDSHAKE && t >= a->timer) ||
                (a->phase == ECHO && a->line == 0 && !gated))
                step(a, ctx, ready, gated);
        }
        int echoing = 0;
        for (int i = 0; i < associations; i++)
            echoing |= as[i].phase == ECHO || as[i].phase == HANDSHAKE;
        if (!echoing && echo_end == 0 && all_connected) {
            echo_end = now();
            echo_cpu1 = cpu_us();
        }
    }
    if (echo_end == 0) {
        echo_end = now();
        echo_cpu1 = cpu_us();
    }
    printf("summary associations=%d lines=%ld echoed=%ld lost=%ld retransmits=%ld moves=%ld "
           "survived=%ld survived_first_try=%ld cpu_us=%ld echo_wall_ms=%.1f echo_cpu_us=%ld\n",
           associations, (long)associations * lines * (resume ? 2 : 1), echoed, lost,
           retransmits, moves, survived, survived_first, cpu_us(),
           (echo_end - echo_start) * 1000, echo_cpu1 - echo_cpu0);
    wolfSSL_CTX_free(ctx);
    wolfSSL_Cleanup();
    free(as);
    free(pfds);
    return lost == 0 ? 0 : 1;
}
