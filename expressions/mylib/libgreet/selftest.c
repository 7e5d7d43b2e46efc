#include <stdio.h>
#include <string.h>
#include "greet.h"

int main(void)
{
    char buf[64];
    int n = greet_format(buf, sizeof buf, "Hi", "test");
    if (n != 9 || strcmp(buf, "Hi, test!") != 0 || greet_count() != 1) {
        fprintf(stderr, "selftest failed: %d %s\n", n, buf);
        return 1;
    }
    puts("libgreet selftest ok");
    return 0;
}
