package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/pki"
)

const (
	// healthcheckTimeout bounds the probe; container runtimes give a check
	// 30 s by default.
	healthcheckTimeout = 5 * time.Second
	// maxReadyzBody bounds what is read of the answer.
	maxReadyzBody = 64 << 10
)

// healthcheckUsage introduces `sovrad healthcheck --help`.
const healthcheckUsage = `usage: sovrad healthcheck [flags]

Asks the daemon that the same flags and SOVRA_* variables configure (--listen,
--data-dir) whether it is ready, on /readyz, verifying it with the data
directory's ca.crt. Exits 0 when ready, 1 when not (printing the checks), 2 on
bad flags.

Flags:
`

// healthcheckCommand runs "sovrad healthcheck [flags]": it asks the daemon
// configured by the same flags and SOVRA_* variables (--listen, --data-dir)
// whether it is ready, on /readyz, verifying it with the data directory's
// CA. It exits 0 when ready, 1 when not (printing the checks), 2 on bad
// flags: a container HEALTHCHECK or an exec probe.
func healthcheckCommand(args []string, stdout, stderr io.Writer) int {
	cfg := config.New()
	if err := cfg.Parse(args, os.Getenv); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, healthcheckUsage+cfg.Usage())
			return exitOK
		}
		printErrors(stderr, "sovrad healthcheck: bad arguments", err)
		return exitUsage
	}
	body, err := readyz(cfg)
	if err != nil {
		fmt.Fprintf(stderr, "sovrad healthcheck: not ready: %v\n%s", err, body)
		return exitFailed
	}
	fmt.Fprint(stdout, body)
	return exitOK
}

// readyz asks the API server at cfg.Listen for /readyz?verbose and returns
// the answer; an error unless it is 200 OK.
func readyz(cfg *config.Config) (string, error) {
	ip, port, err := cfg.ListenHostPort()
	if err != nil {
		return "", fmt.Errorf("%s %q: %w", cfg.Source("listen"), cfg.Listen, err)
	}
	switch {
	// Listening on every interface: ask on loopback, which the serving
	// certificate names.
	case ip.IsUnspecified() && ip.To4() != nil:
		ip = net.IPv4(127, 0, 0, 1)
	case ip.IsUnspecified():
		ip = net.IPv6loopback
	}
	caFile := filepath.Join(cfg.DataDir, pki.CACert)
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return "", fmt.Errorf("reading the API's CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		return "", fmt.Errorf("reading the API's CA: no certificate in %s", caFile)
	}
	client := &http.Client{
		Timeout:   healthcheckTimeout,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}},
	}
	url := "https://" + net.JoinHostPort(ip.String(), strconv.Itoa(port)) + "/readyz?verbose"
	resp, err := client.Get(url)
	if err != nil {
		return "", fmt.Errorf("asking %s: %w", url, err)
	}
	defer resp.Body.Close() //nolint:errcheck
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxReadyzBody))
	if err != nil {
		return "", fmt.Errorf("reading the answer of %s: %w", url, err)
	}
	body := string(b)
	if !strings.HasSuffix(body, "\n") {
		body += "\n"
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("%s answered %s", url, resp.Status)
	}
	return body, nil
}
