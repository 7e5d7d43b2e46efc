#ifndef GREET_H
#define GREET_H
/* libgreet: a tiny C library built by purestore's stdenv (static, musl). */
#define GREET_VERSION "1.0"
/* Writes "<greeting>, <name>!" into buf (at most size bytes); returns the length it needed. */
int greet_format(char *buf, unsigned long size, const char *greeting, const char *name);
/* Returns the number of times greet_format was called in this process. */
unsigned long greet_count(void);
#endif
