package main

import (
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/pflag"

	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/internal/attest"
)

// maxEKFile bounds what ek-hash reads: a PEM of the largest EK the node API
// accepts fits well within it.
const maxEKFile = 64 << 10

// ekHashUsage explains the ek-hash command.
const ekHashUsage = `usage: sovrad ek-hash --cert FILE
       sovrad ek-hash --pub FILE

Prints the EK hash of a TPM and the name of its SovraNode record, computed
as enrollment computes them (SHA-256 of the EK public key's PKIX DER), so
that an operator can pre-register the node from a hardware inventory or list
it in --ek-allow-list before it first boots. FILE ("-" for standard input) is
PEM or DER:

  --cert  the TPM's EK certificate (e.g. tpm2_nvread 0x1c00002, or the
          manufacturer's inventory)
  --pub   the EK public key, PKIX (e.g. tpm2_readpublic -c 0x81010001 -f pem)

The output is YAML for the record's metadata.name and spec.ekHash.
`

// ekHashCommand runs "sovrad ek-hash ..." and returns the exit code.
func ekHashCommand(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("sovrad ek-hash", pflag.ContinueOnError)
	fs.Usage = func() {}
	fs.SetOutput(io.Discard)
	cert := fs.String("cert", "", "EK certificate, PEM or DER")
	pub := fs.String("pub", "", "EK public key, PKIX PEM or DER")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprint(stdout, ekHashUsage)
			return exitOK
		}
		fmt.Fprintf(stderr, "sovrad ek-hash: %v\n%s", err, ekHashUsage)
		return exitUsage
	}
	if (*cert == "") == (*pub == "") || fs.NArg() > 0 {
		fmt.Fprintf(stderr, "sovrad ek-hash: give one of --cert and --pub\n%s", ekHashUsage)
		return exitUsage
	}
	path := *cert + *pub
	der, err := readDER(path, *cert != "")
	if err != nil {
		fmt.Fprintf(stderr, "sovrad ek-hash: %v\n", err)
		return exitFailed
	}
	var ek *attest.EK
	if *cert != "" {
		ek, err = attest.ParseEK(der, nil)
	} else {
		ek, err = attest.ParseEK(nil, der)
	}
	if err != nil {
		fmt.Fprintf(stderr, "sovrad ek-hash: %s: %v\n", path, err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "name: %s\nekHash: %s\n", attestation.NodeName(ek.Hash), ek.Hash)
	return exitOK
}

// readDER reads a PEM or DER file ("-": standard input) and returns the DER
// of its first block of the wanted kind.
func readDER(path string, cert bool) ([]byte, error) {
	r := io.Reader(os.Stdin)
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("reading the EK: %w", err)
		}
		defer f.Close() //nolint:errcheck
		r = f
	}
	data, err := io.ReadAll(io.LimitReader(r, maxEKFile+1))
	if err != nil {
		return nil, fmt.Errorf("reading the EK: %w", err)
	}
	if len(data) > maxEKFile {
		return nil, fmt.Errorf("reading the EK: %s is larger than %d bytes", path, maxEKFile)
	}
	want := "PUBLIC KEY"
	if cert {
		want = "CERTIFICATE"
	}
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		switch {
		case block == nil && len(rest) == len(data):
			return data, nil // not PEM: DER
		case block == nil:
			return nil, fmt.Errorf("reading the EK: %s holds no PEM %q block", path, want)
		case block.Type == want:
			return block.Bytes, nil
		}
	}
}
