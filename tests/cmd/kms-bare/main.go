// Command kms-bare is the KMS benchmark's bare server (tests/kms
// BenchmarkBootStorm): the Talos KMS service over sovrad's node API
// transport, and nothing else. It serves with the TLS identity of a sovrad
// data directory (node-api.crt and node-api.key; client certificates
// verified against node-ca.crt when given, as sovrad does), the node API's
// gRPC server options (nodeapi.TransportOptions) and its connection caps
// (package connlimit, with sovrad's defaults), and answers every Unseal with
// a fixed 32-byte key without looking at it. What sovrad spends on top of
// this server is what its KMS costs; this server's cost is the physical
// limit of a fresh TLS connection per call on this host. It is never shipped.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"google.golang.org/grpc"

	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/connlimit"
	"github.com/sovra-dev/sovra/daemon/datadir"
	"github.com/sovra-dev/sovra/daemon/nodeapi"
)

// keySize is the size of the key every Unseal answers: Talos seals 32 bytes.
const keySize = 32

func main() {
	dataDir := flag.String("data-dir", "", "sovrad data directory to take the node API's TLS identity from")
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	flag.Parse()
	if err := run(*dataDir, *listen); err != nil {
		fmt.Fprintln(os.Stderr, "kms-bare:", err)
		os.Exit(1)
	}
}

func run(dataDir, listen string) error {
	if dataDir == "" {
		return errors.New("--data-dir is required")
	}
	tlsCfg, err := serverTLS(dataDir)
	if err != nil {
		return err
	}
	defaults := config.New().NodeAPI
	limiter := connlimit.New(connlimit.Config{PerSource: defaults.MaxConnsPerIP, Total: defaults.MaxConns}, nil)
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", listen, err)
	}
	g := grpc.NewServer(nodeapi.TransportOptions(tlsCfg)...)
	kmsapi.RegisterKMSServiceServer(g, fixedKey{key: make([]byte, keySize)})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		g.Stop()
	}()
	fmt.Printf("kms-bare listening on %s\n", lis.Addr())
	if err := g.Serve(limiter.Wrap(lis, "KMS")); err != nil {
		return fmt.Errorf("serving: %w", err)
	}
	return nil
}

// serverTLS is the TLS configuration sovrad gives its node API (package
// server): its serving pair, and client certificates verified against the
// node CA when given.
func serverTLS(dataDir string) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(dataDir, datadir.NodeServeCert), filepath.Join(dataDir, datadir.NodeServeKey))
	if err != nil {
		return nil, fmt.Errorf("loading the node API certificate: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dataDir, datadir.NodeCACert))
	if err != nil {
		return nil, fmt.Errorf("reading the node CA: %w", err)
	}
	cas := x509.NewCertPool()
	if !cas.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("reading the node CA: no certificate in it")
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		MinVersion:   tls.VersionTLS12,
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    cas,
	}, nil
}

// fixedKey answers every Unseal with the same key.
type fixedKey struct {
	kmsapi.UnimplementedKMSServiceServer
	key []byte
}

func (f fixedKey) Unseal(context.Context, *kmsapi.Request) (*kmsapi.Response, error) {
	return &kmsapi.Response{Data: f.key}, nil
}
