/* untar: extract a tar stream from stdin into the current directory (or -C DIR).
 *
 * Why it exists: busybox's tar (our seed) rejects pre-POSIX (v7) archives such as GNU hello
 * 2.10's release tarball ("invalid tar magic").  This reader accepts v7, ustar, GNU (long names
 * 'L'/'K') and pax ('x' path/linkpath; 'g' ignored) headers; writes regular files (owner x bit
 * kept), directories, symlinks and hard links (as copies); refuses absolute paths and '..'.
 * Modification times are restored (make compares them: generated files such as 'configure' must
 * stay newer than their sources); owners and other mode bits are not.
 *
 * Usage: untar [-C DIR] [-v] < archive.tar
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int verbose;

static void die(const char *what, const char *name)
{
    fprintf(stderr, "untar: %s%s%s\n", what, name ? ": " : "", name ? name : "");
    exit(1);
}

static int read_full(void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(0, (char *)buf + got, n - got);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("read error", strerror(errno));
        }
        if (r == 0) return got == 0 ? 0 : -1;
        got += (size_t)r;
    }
    return 1;
}

static unsigned long long octal(const char *p, size_t n)
{
    unsigned long long v = 0;
    if ((unsigned char)p[0] & 0x80) { /* GNU base-256 */
        for (size_t i = 1; i < n; i++) v = (v << 8) | (unsigned char)p[i];
        return v;
    }
    for (size_t i = 0; i < n && p[i]; i++) {
        if (p[i] == ' ') continue;
        if (p[i] < '0' || p[i] > '7') break;
        v = v * 8 + (unsigned)(p[i] - '0');
    }
    return v;
}

static char *read_data(unsigned long long size)
{
    unsigned long long padded = (size + 511) & ~511ULL;
    char *buf = malloc(padded + 1);
    if (!buf) die("out of memory", NULL);
    if (padded && read_full(buf, padded) != 1) die("truncated archive", NULL);
    buf[size] = 0;
    return buf;
}

static void skip(unsigned long long size)
{
    char block[512];
    for (unsigned long long left = (size + 511) & ~511ULL; left; left -= 512)
        if (read_full(block, 512) != 1) die("truncated archive", NULL);
}

static void check_path(const char *name)
{
    if (name[0] == '/') die("refusing absolute path", name);
    const char *p = name;
    while (*p) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (len == 2 && p[0] == '.' && p[1] == '.') die("refusing path with '..'", name);
        if (!slash) break;
        p = slash + 1;
    }
}

static void make_parents(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(path, 0755) != 0 && errno != EEXIST) die("cannot create directory", path);
        *p = '/';
    }
}

static void copy_file(const char *from, const char *to)
{
    int in = open(from, O_RDONLY), out;
    struct stat st;
    char buf[65536];
    ssize_t r;
    if (in < 0 || fstat(in, &st) != 0) die("hard link target missing", from);
    unlink(to);
    out = open(to, O_WRONLY | O_CREAT | O_TRUNC, (st.st_mode & 0100) ? 0755 : 0644);
    if (out < 0) die("cannot create", to);
    while ((r = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)r) != r) die("write error", to);
    close(in);
    close(out);
}

/* pax extended header: "LEN key=value\n" records */
static void set_mtime(const char *name, long long mtime, int nofollow)
{
    struct timespec ts[2];
    ts[0].tv_sec = ts[1].tv_sec = (time_t)mtime;
    ts[0].tv_nsec = ts[1].tv_nsec = 0;
    utimensat(AT_FDCWD, name, ts, nofollow ? AT_SYMLINK_NOFOLLOW : 0);
}

static long long pax_mtime = -1;

static void pax(const char *data, unsigned long long size, char **path, char **linkpath)
{
    const char *p = data, *end = data + size;
    while (p < end) {
        char *sp;
        unsigned long len = strtoul(p, &sp, 10);
        if (len == 0 || *sp != ' ' || p + len > end) die("bad pax header", NULL);
        const char *kv = sp + 1, *rec_end = p + len - 1; /* points at '\n' */
        const char *eq = memchr(kv, '=', (size_t)(rec_end - kv));
        if (eq) {
            size_t klen = (size_t)(eq - kv), vlen = (size_t)(rec_end - eq - 1);
            char **dst = NULL;
            if (klen == 4 && !memcmp(kv, "path", 4)) dst = path;
            else if (klen == 8 && !memcmp(kv, "linkpath", 8)) dst = linkpath;
            if (klen == 5 && !memcmp(kv, "mtime", 5)) pax_mtime = strtoll(eq + 1, NULL, 10);
            if (dst) {
                free(*dst);
                *dst = malloc(vlen + 1);
                memcpy(*dst, eq + 1, vlen);
                (*dst)[vlen] = 0;
            }
        }
        p += len;
    }
}

int main(int argc, char **argv)
{
    unsigned char h[512];
    char *long_name = NULL, *long_link = NULL;
    int zero_blocks = 0, opt;
    while ((opt = getopt(argc, argv, "C:v")) != -1) {
        if (opt == 'C') { if (chdir(optarg) != 0) die("cannot change to", optarg); }
        else if (opt == 'v') verbose = 1;
        else { fprintf(stderr, "usage: untar [-C DIR] [-v] < archive.tar\n"); return 2; }
    }
    umask(022);
    for (;;) {
        int r = read_full(h, 512);
        if (r == 0) break;
        if (r < 0) die("truncated archive", NULL);
        int all_zero = 1;
        for (int i = 0; i < 512; i++) if (h[i]) { all_zero = 0; break; }
        if (all_zero) { if (++zero_blocks == 2) break; continue; }
        zero_blocks = 0;

        unsigned long long sum = 0, want = octal((char *)h + 148, 8);
        for (int i = 0; i < 512; i++) sum += (i >= 148 && i < 156) ? ' ' : h[i];
        if (sum != want) die("header checksum mismatch (not a tar archive?)", NULL);

        char type = (char)h[156];
        unsigned long long size = octal((char *)h + 124, 12);
        unsigned mode = (unsigned)octal((char *)h + 100, 8);
        long long mtime = (long long)octal((char *)h + 136, 12);
        if (type == 'L' || type == 'K') {
            char *d = read_data(size);
            if (type == 'L') { free(long_name); long_name = d; } else { free(long_link); long_link = d; }
            continue;
        }
        if (type == 'x') {
            char *d = read_data(size);
            pax(d, size, &long_name, &long_link);
            free(d);
            continue;
        }
        if (type == 'g') { skip(size); continue; }

        char name[512], link[512];
        if (long_name) {
            snprintf(name, sizeof name, "%s", long_name);
        } else {
            char n[101], prefix[156];
            memcpy(n, h, 100); n[100] = 0;
            int ustar = !memcmp(h + 257, "ustar", 5);
            if (ustar && h[345]) {
                memcpy(prefix, h + 345, 155); prefix[155] = 0;
                snprintf(name, sizeof name, "%s/%s", prefix, n);
            } else {
                snprintf(name, sizeof name, "%s", n);
            }
        }
        if (long_link) snprintf(link, sizeof link, "%s", long_link);
        else { memcpy(link, h + 157, 100); link[100] = 0; }
        free(long_name); long_name = NULL;
        free(long_link); long_link = NULL;
        if (pax_mtime >= 0) { mtime = pax_mtime; pax_mtime = -1; }

        size_t len = strlen(name);
        while (len > 1 && name[len - 1] == '/') { if (type == 0 || type == '0') type = '5'; name[--len] = 0; }
        while (!strncmp(name, "./", 2)) memmove(name, name + 2, strlen(name + 2) + 1);
        if (!name[0] || !strcmp(name, ".")) { skip(type == '5' ? 0 : size); continue; }
        check_path(name);
        make_parents(name);
        if (verbose) fprintf(stderr, "%s\n", name);

        switch (type) {
        case '5':
            if (mkdir(name, 0755) != 0 && errno != EEXIST) die("cannot create directory", name);
            skip(size);
            break;
        case '2':
            unlink(name);
            if (symlink(link, name) != 0) die("cannot create symlink", name);
            set_mtime(name, mtime, 1);
            break;
        case '1':
            check_path(link);
            copy_file(link, name);
            set_mtime(name, mtime, 0);
            break;
        case 0: case '0': case '7': {
            unlink(name);
            int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, (mode & 0100) ? 0755 : 0644);
            if (fd < 0) die("cannot create", name);
            char block[512];
            unsigned long long left = size;
            while (left) {
                if (read_full(block, 512) != 1) die("truncated archive", name);
                size_t n = left < 512 ? (size_t)left : 512;
                if (write(fd, block, n) != (ssize_t)n) die("write error", name);
                left -= n;
            }
            close(fd);
            set_mtime(name, mtime, 0);
            break;
        }
        default:  /* devices, fifos, unknown: skipped */
            fprintf(stderr, "untar: skipping %s (type '%c')\n", name, type);
            skip(size);
        }
    }
    return 0;
}
