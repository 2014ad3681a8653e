/*
 * ktls-probe: checks that the running kernel offers kTLS.
 *
 * Built and run by scripts/ktls-vm.sh --probe (inside the VM). Steps:
 *   1. TCP listener on 127.0.0.1, connect to it, accept.
 *   2. setsockopt(SOL_TCP, TCP_ULP, "tls") on the connected socket; print the
 *      result and read the ULP name back with getsockopt.
 *   3. For AES-GCM-128, AES-GCM-256, ChaCha20-Poly1305 and AES-CCM-128
 *      (TLS 1.3 parameters): a fresh connection, TLS_TX on one end, TLS_RX on
 *      the other with the same key, send a message and check that the kernel
 *      decrypts it back to the same bytes.
 *   4. Print /proc/net/tls_stat and /proc/sys/net/ipv4/tcp_available_ulp.
 *
 * Exit status: 0 only if step 2 succeeded and every cipher in step 3 worked,
 * 1 otherwise. "--exit N" as the first two arguments makes it exit N after all
 * checks whatever they found (used to test exit-status plumbing). Every
 * argument is printed first, bracketed, so argument passing can be checked.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/utsname.h>
#include <unistd.h>
#include <linux/tls.h>

#ifndef SOL_TCP
#define SOL_TCP 6
#endif
#ifndef TCP_ULP
#define TCP_ULP 31
#endif
#ifndef SOL_TLS
#define SOL_TLS 282
#endif

static void print_file(const char *path)
{
	char buf[4096];
	FILE *f = fopen(path, "r");
	size_t n;

	printf("--- %s\n", path);
	if (!f) {
		printf("(cannot open: %s)\n", strerror(errno));
		return;
	}
	while ((n = fread(buf, 1, sizeof buf, f)) > 0)
		fwrite(buf, 1, n, stdout);
	fclose(f);
	printf("--- end %s\n", path);
}

/* A connected TCP pair over loopback: *c is the connecting end, *s the accepted one. */
static int tcp_pair(int *c, int *s)
{
	struct sockaddr_in addr;
	socklen_t len = sizeof addr;
	struct timeval tv = { .tv_sec = 10 };
	int l;

	*c = *s = -1;
	l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0) {
		perror("socket");
		return -1;
	}
	memset(&addr, 0, sizeof addr);
	addr.sin_family = AF_INET;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	addr.sin_port = 0;
	if (bind(l, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(l, 1) < 0 ||
	    getsockname(l, (struct sockaddr *)&addr, &len) < 0) {
		perror("bind/listen/getsockname");
		close(l);
		return -1;
	}
	*c = socket(AF_INET, SOCK_STREAM, 0);
	if (*c < 0 || connect(*c, (struct sockaddr *)&addr, sizeof addr) < 0) {
		perror("connect");
		close(l);
		return -1;
	}
	*s = accept(l, NULL, NULL);
	close(l);
	if (*s < 0) {
		perror("accept");
		close(*c);
		return -1;
	}
	/* Never hang the VM: a lost record shows up as a timeout, not a stall. */
	setsockopt(*s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(*c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	return 0;
}

static int set_ulp(int fd)
{
	return setsockopt(fd, SOL_TCP, TCP_ULP, "tls", 3);
}

/* Fill a crypto_info for `cipher` with fixed (test-only) key material. */
static size_t make_info(int cipher, unsigned char *buf, size_t cap)
{
	memset(buf, 0, cap);
	switch (cipher) {
	case TLS_CIPHER_AES_GCM_128: {
		struct tls12_crypto_info_aes_gcm_128 *i = (void *)buf;
		i->info.version = TLS_1_3_VERSION;
		i->info.cipher_type = cipher;
		memset(i->key, 0x11, sizeof i->key);
		memset(i->iv, 0x22, sizeof i->iv);
		memset(i->salt, 0x33, sizeof i->salt);
		return sizeof *i;
	}
	case TLS_CIPHER_AES_GCM_256: {
		struct tls12_crypto_info_aes_gcm_256 *i = (void *)buf;
		i->info.version = TLS_1_3_VERSION;
		i->info.cipher_type = cipher;
		memset(i->key, 0x11, sizeof i->key);
		memset(i->iv, 0x22, sizeof i->iv);
		memset(i->salt, 0x33, sizeof i->salt);
		return sizeof *i;
	}
	case TLS_CIPHER_CHACHA20_POLY1305: {
		struct tls12_crypto_info_chacha20_poly1305 *i = (void *)buf;
		i->info.version = TLS_1_3_VERSION;
		i->info.cipher_type = cipher;
		memset(i->key, 0x11, sizeof i->key);
		memset(i->iv, 0x22, sizeof i->iv);
		return sizeof *i;
	}
	case TLS_CIPHER_AES_CCM_128: {
		struct tls12_crypto_info_aes_ccm_128 *i = (void *)buf;
		i->info.version = TLS_1_3_VERSION;
		i->info.cipher_type = cipher;
		memset(i->key, 0x11, sizeof i->key);
		memset(i->iv, 0x22, sizeof i->iv);
		memset(i->salt, 0x33, sizeof i->salt);
		return sizeof *i;
	}
	}
	return 0;
}

/* One kernel-encrypted message from c to s, kernel-decrypted on s. Returns 0 on success. */
static int cipher_roundtrip(const char *name, int cipher)
{
	static const char msg[] = "hello from kTLS";
	unsigned char info[256];
	char got[sizeof msg];
	size_t len = make_info(cipher, info, sizeof info);
	size_t have = 0;
	int c, s, rc = -1;

	if (tcp_pair(&c, &s) < 0)
		return -1;
	if (set_ulp(c) < 0 || set_ulp(s) < 0) {
		printf("cipher %-18s FAIL TCP_ULP: %s\n", name, strerror(errno));
		goto out;
	}
	if (setsockopt(c, SOL_TLS, TLS_TX, info, len) < 0) {
		printf("cipher %-18s FAIL TLS_TX: %s (errno %d)\n", name, strerror(errno), errno);
		goto out;
	}
	if (setsockopt(s, SOL_TLS, TLS_RX, info, len) < 0) {
		printf("cipher %-18s FAIL TLS_RX: %s (errno %d)\n", name, strerror(errno), errno);
		goto out;
	}
	if (send(c, msg, sizeof msg, 0) != (ssize_t)sizeof msg) {
		printf("cipher %-18s FAIL send: %s\n", name, strerror(errno));
		goto out;
	}
	while (have < sizeof msg) {
		ssize_t n = recv(s, got + have, sizeof msg - have, 0);
		if (n <= 0) {
			printf("cipher %-18s FAIL recv: %s\n", name, n < 0 ? strerror(errno) : "EOF");
			goto out;
		}
		have += (size_t)n;
	}
	if (memcmp(got, msg, sizeof msg) != 0) {
		printf("cipher %-18s FAIL: decrypted bytes differ\n", name);
		goto out;
	}
	printf("cipher %-18s ok (TLS_TX + TLS_RX round trip)\n", name);
	rc = 0;
out:
	close(c);
	close(s);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int id;
	} ciphers[] = {
		{ "AES_GCM_128", TLS_CIPHER_AES_GCM_128 },
		{ "AES_GCM_256", TLS_CIPHER_AES_GCM_256 },
		{ "CHACHA20_POLY1305", TLS_CIPHER_CHACHA20_POLY1305 },
		{ "AES_CCM_128", TLS_CIPHER_AES_CCM_128 },
	};
	struct utsname u;
	char ulp[16] = "";
	socklen_t ulp_len = sizeof ulp - 1;
	int forced_exit = -1, failures = 0, c, s, i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 0; i < argc; i++)
		printf("argv[%d]=[%s]\n", i, argv[i]);
	if (argc >= 3 && strcmp(argv[1], "--exit") == 0)
		forced_exit = atoi(argv[2]);
	if (uname(&u) == 0)
		printf("kernel: %s %s\n", u.release, u.version);

	if (tcp_pair(&c, &s) < 0)
		return forced_exit >= 0 ? forced_exit : 1;
	if (set_ulp(c) == 0) {
		printf("TCP_ULP tls: ok\n");
		if (getsockopt(c, SOL_TCP, TCP_ULP, ulp, &ulp_len) == 0)
			printf("getsockopt TCP_ULP: \"%s\"\n", ulp);
		else
			printf("getsockopt TCP_ULP failed: %s\n", strerror(errno));
		if (strcmp(ulp, "tls") != 0)
			failures++;
		for (i = 0; i < (int)(sizeof ciphers / sizeof ciphers[0]); i++)
			if (cipher_roundtrip(ciphers[i].name, ciphers[i].id) != 0)
				failures++;
	} else {
		printf("TCP_ULP tls: FAILED errno=%d (%s)\n", errno, strerror(errno));
		failures++;
	}
	close(c);
	close(s);

	print_file("/proc/net/tls_stat");
	print_file("/proc/sys/net/ipv4/tcp_available_ulp");
	printf("probe result: %s\n", failures ? "FAIL" : "PASS");
	if (forced_exit >= 0)
		return forced_exit;
	return failures ? 1 : 0;
}
