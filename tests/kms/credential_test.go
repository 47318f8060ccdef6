package kms

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/sovradtest"
)

// TestMasterKeyFromSystemdCredential runs sovrad as the systemd unit does:
// no --master-key-file, and the keyring handed over by LoadCredential=, a
// read-only (0400) file in $CREDENTIALS_DIRECTORY. The KMS is on with that
// keyring and says where it came from; a credential other users may read is
// refused (exit code 2) under its credential's name.
func TestMasterKeyFromSystemdCredential(t *testing.T) {
	creds := filepath.Join(t.TempDir(), "credentials")
	if err := os.Mkdir(creds, 0o500|0o200); err != nil {
		t.Fatal(err)
	}
	keyring := filepath.Join(creds, "master.keys")
	if out, err := exec.Command(testutil.Bin(t, "sovrad"), "keyring", "init", keyring).CombinedOutput(); err != nil {
		t.Fatalf("keyring init: %v\n%s", err, out)
	}
	if err := os.Chmod(keyring, 0o400); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(keyring)
	t.Setenv("CREDENTIALS_DIRECTORY", creds)

	addr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	d := sovradtest.Start(t, filepath.Join(t.TempDir(), "data"), "--node-listen", addr, "--controllers", "none")
	k := &kmsDaemon{Daemon: d, t: t, KMSAddr: addr, KeyFile: keyring}
	k.connect()
	if log := d.LogSince(0); !strings.Contains(log, `"msg":"master keyring loaded","file":"`+keyring+`","from":"credential master.keys"`) {
		t.Fatalf("no log line says the keyring came from the credential:\n%s", d.Tail(40))
	}
	ctx := context.Background()
	n := newNode(t)
	if err := k.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	secret := key(t)
	blob := k.sealEventually(ctx, n, secret)
	if got, err := k.Unseal(ctx, n.UUID, blob); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Unseal: %v", err)
	}
	if after, _ := os.ReadFile(keyring); !bytes.Equal(after, before) {
		t.Fatal("sovrad changed the credential")
	}
	d.Stop()

	if err := os.Chmod(keyring, 0o440); err != nil {
		t.Fatal(err)
	}
	ctxRun, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctxRun, testutil.Bin(t, "sovrad"), "--data-dir", d.DataDir, "--node-listen", addr).CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(string(out), "credential master.keys "+keyring+": mode 0440 lets other users read it") {
		t.Fatalf("a group-readable credential: %v\n%s", err, out)
	}
}
