#include <stdio.h>
#include "greet.h"

static unsigned long calls;

int greet_format(char *buf, unsigned long size, const char *greeting, const char *name)
{
    calls++;
    return snprintf(buf, size, "%s, %s!", greeting ? greeting : "Hello", name ? name : "world");
}

unsigned long greet_count(void)
{
    return calls;
}
