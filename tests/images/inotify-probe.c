/* A minimal inotify watcher for tier-3 tests (Debian's busybox-static has no inotifyd):
 * watches every path given with IN_ALL_EVENTS, prints "watching" once the watches are in
 * place and then "event <mask in hex>" per event, flushing each line. Built static so it runs
 * in any container, bind-mounted in by the test. */
#include <stdio.h>
#include <sys/inotify.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int fd = inotify_init1(0);
    if (fd < 0) {
        perror("inotify_init1");
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        if (inotify_add_watch(fd, argv[i], IN_ALL_EVENTS) < 0) {
            perror(argv[i]);
            return 1;
        }
    }
    printf("watching\n");
    fflush(stdout);
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) {
            return 1;
        }
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *event = (struct inotify_event *)p;
            printf("event %x\n", event->mask);
            fflush(stdout);
            p += sizeof *event + event->len;
        }
    }
}
