package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/sovra-dev/sovra/daemon/bootconfig"
	"github.com/sovra-dev/sovra/daemon/datadir"
)

// bootConfigTimeout bounds the fetch of the enrollment configuration.
const bootConfigTimeout = 30 * time.Second

// hostsUsage explains the hosts command; the flags follow it.
const hostsUsage = `usage: sovrad hosts boot-config --server https://HOST:PORT [--out FILE] [flags]

Prints how machines boot into sovra's pool: the talos.config= kernel
argument that names sovrad's boot server (--boot-listen), for ISO, PXE and
disk images. With --out it also fetches the enrollment configuration from
that server and writes it to FILE (mode 0600), to embed in boot media or to
give a cloud VM as user-data. The configuration holds no secret of any
cluster; it names no machine, so it opens no sealing window: pre-register
a machine that boots it (see docs/machines.md).

Exit codes: 0 done; 1 the configuration could not be fetched or written;
2 bad flags.

Flags:
`

// hostsCommand runs "sovrad hosts ..." and returns the exit code.
func hostsCommand(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("sovrad hosts boot-config", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var server, out, caFile, dataDir string
	fs.StringVar(&server, "server", "", "the boot server's URL as machines reach it, https://HOST:PORT (required)")
	fs.StringVar(&out, "out", "", "write the enrollment configuration to this file")
	fs.StringVar(&caFile, "ca", "", "CA that verifies the boot server (default: node-ca.crt in the data directory, else the system roots)")
	fs.StringVar(&dataDir, "data-dir", defaultDataDir(), "sovrad's data directory, for its node-ca.crt")
	fs.Usage = func() {
		fmt.Fprint(stderr, hostsUsage)
		fs.PrintDefaults()
	}
	switch {
	case len(args) > 0 && (args[0] == "--help" || args[0] == "-h" || args[0] == "help"):
		fs.Usage()
		return exitOK
	case len(args) == 0 || args[0] != "boot-config":
		fmt.Fprintln(stderr, "sovrad hosts: unknown or missing subcommand: use boot-config")
		fs.Usage()
		return exitUsage
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	base, err := bootServerURL(server)
	if err != nil {
		fmt.Fprintf(stderr, "sovrad hosts boot-config: --server: %v\n", err)
		return exitUsage
	}
	arg := "talos.config=" + bootconfig.URL(base.Host)
	fmt.Fprintf(stdout, "Kernel argument (ISO, disk image, PXE; Talos substitutes ${uuid}):\n  %s\n", arg)
	fmt.Fprintf(stdout, "Imager:\n  --extra-kernel-arg '%s'\n", arg)
	if out == "" {
		return exitOK
	}
	if caFile == "" {
		if p := filepath.Join(dataDir, datadir.NodeCACert); fileExists(p) {
			caFile = p
		}
	}
	body, err := fetchBootConfig(base, caFile)
	if err != nil {
		fmt.Fprintf(stderr, "sovrad hosts boot-config: %v\n", err)
		return exitFailed
	}
	if err := os.WriteFile(out, body, 0o600); err != nil {
		fmt.Fprintf(stderr, "sovrad hosts boot-config: writing %s: %v\n", out, err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "Enrollment configuration (%d bytes) written to %s: embed it in boot media or give it as user-data.\n", len(body), out)
	return exitOK
}

// bootServerURL checks --server: an https URL with a host, nothing else.
func bootServerURL(s string) (*url.URL, error) {
	if s == "" {
		return nil, errors.New("required: the boot server as machines reach it, e.g. https://sovra.example.net:7444")
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return nil, fmt.Errorf("%q is not a URL: %w", s, err)
	case u.Scheme != "https" || u.Host == "":
		return nil, fmt.Errorf("%q: want https://HOST:PORT (the boot server serves TLS only)", s)
	case strings.Trim(u.Path, "/") != "" || u.RawQuery != "":
		return nil, fmt.Errorf("%q: give the server only, without a path", s)
	}
	return u, nil
}

// fetchBootConfig fetches the enrollment configuration, naming no machine.
func fetchBootConfig(base *url.URL, caFile string) ([]byte, error) {
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("reading the CA: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("the CA %s holds no PEM certificate", caFile)
		}
		tlsCfg.RootCAs = roots
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootConfigTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base.JoinPath(bootconfig.Path).String(), nil)
	if err != nil {
		return nil, fmt.Errorf("fetching the enrollment configuration: %w", err)
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg}}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching the enrollment configuration: %w", err)
	}
	defer resp.Body.Close() //nolint:errcheck
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBootConfig))
	if err != nil {
		return nil, fmt.Errorf("fetching the enrollment configuration: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetching the enrollment configuration: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

// maxBootConfig bounds the configuration read (it is a few tens of KiB).
const maxBootConfig = 4 << 20

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

