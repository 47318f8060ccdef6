package kms

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/pgtest"
)

// sealed is what a node holds after sealing: its blob, and (for the test's
// eyes only) the key inside.
type sealed struct {
	node      node
	key, blob []byte
}

// sealSome enrolls n nodes, seals a key for each and unseals it once.
func sealSome(t *testing.T, d *kmsDaemon, n int) []sealed {
	t.Helper()
	ctx := context.Background()
	var out []sealed
	for range n {
		nd := newNode(t)
		if err := d.createNode(ctx, nd, attestedNode); err != nil {
			t.Fatal(err)
		}
		k := key(t)
		blob := d.sealEventually(ctx, nd, k)
		if got := d.unsealEventually(ctx, nd, blob); !bytes.Equal(got, k) {
			t.Fatal("unsealed other data")
		}
		out = append(out, sealed{node: nd, key: k, blob: blob})
	}
	return out
}

// masterKeys reads the raw master keys from the keyring file: the test
// needs them to prove they are nowhere else.
func masterKeys(t *testing.T, path string) [][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var keys [][]byte
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 2 && !strings.HasPrefix(fields[0], "#") {
			k, err := base64.StdEncoding.DecodeString(fields[1])
			if err != nil {
				t.Fatal(err)
			}
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		t.Fatal("no master key in the keyring")
	}
	return keys
}

// inspect checks a datastore image: it holds every node's salt (so the
// image is the real thing), but no key and no master key in any encoding;
// and no 32-byte window of it, taken as a master key, opens any blob.
func inspect(t *testing.T, image []byte, d *kmsDaemon, all []sealed) {
	t.Helper()
	ctx := context.Background()
	for _, s := range all {
		salt := d.getNode(ctx, s.node).Status.KeySalt
		if !bytes.Contains(image, []byte(base64.StdEncoding.EncodeToString(salt))) {
			t.Fatalf("the datastore image lacks the salt of %s: wrong image?", s.node.Name)
		}
		if enc, ok := findSecret(image, s.key); ok {
			t.Fatalf("the datastore holds the key of %s (%s)", s.node.Name, enc)
		}
	}
	for _, mk := range masterKeys(t, d.KeyFile) {
		if enc, ok := findSecret(image, mk); ok {
			t.Fatalf("the datastore holds the master key (%s)", enc)
		}
	}
	// An attacker with the datastore and the blobs tries every 32-byte
	// window of the datastore (and of its base64-decoded strings) as the
	// master key, with the node's real salt from the same datastore.
	candidates := [][]byte{image}
	for _, field := range bytes.FieldsFunc(image, func(r rune) bool { return !isBase64(r) }) {
		if dec, err := base64.StdEncoding.DecodeString(string(field)); err == nil && len(dec) >= custody.MasterKeySize {
			candidates = append(candidates, dec)
		}
	}
	s := all[0]
	salt := d.getNode(ctx, s.node).Status.KeySalt
	var tried, opened atomic.Int64
	var wg sync.WaitGroup
	work := make(chan []byte)
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for w := range work {
				k, err := custody.NewKeyring(map[uint32][]byte{1: w})
				if err != nil {
					continue
				}
				tried.Add(1)
				if _, err := k.Open(salt, s.node.UUID, s.blob); err == nil {
					opened.Add(1)
				}
			}
		}()
	}
	for _, c := range candidates {
		for i := 0; i+custody.MasterKeySize <= len(c); i++ {
			work <- c[i : i+custody.MasterKeySize]
		}
	}
	close(work)
	wg.Wait()
	if opened.Load() > 0 {
		t.Fatal("a window of the datastore opened a blob")
	}
	t.Logf("datastore image: %d bytes; no key, no master key; %d candidate master keys from it opened nothing",
		len(image), tried.Load())
}

func isBase64(r rune) bool {
	return r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '+' || r == '/' || r == '='
}

// TestDatastoreHoldsNoKeySQLite reads the SQLite files directly.
func TestDatastoreHoldsNoKeySQLite(t *testing.T) {
	d := startKMS(t)
	all := sealSome(t, d, 3)
	var image []byte
	files, _ := filepath.Glob(filepath.Join(d.DataDir, "db", "*"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		image = append(image, b...)
	}
	if len(files) == 0 {
		t.Fatal("no SQLite files")
	}
	inspect(t, image, d, all)
	// The master keyring is outside the data directory and private.
	st, err := os.Stat(d.KeyFile)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("master keyring: %v %v", st.Mode(), err)
	}
	if strings.HasPrefix(d.KeyFile, d.DataDir) {
		t.Fatal("the keyring is in the data directory")
	}
}

// TestDatastoreHoldsNoKeyPostgres reads a pg_dump of the database.
func TestDatastoreHoldsNoKeyPostgres(t *testing.T) {
	pg := pgtest.Start(t)
	dataDir := filepath.Join(t.TempDir(), "data")
	keyFile := filepath.Join(t.TempDir(), "master.key")
	d := startKMSWith(t, dataDir, keyFile, testutil.FreePort(t), "--datastore", pg.DSN("sovra"))
	all := sealSome(t, d, 3)
	inspect(t, decodeBytea(pg.Dump("sovra")), d, all)
}

// byteaPattern is how pg_dump writes bytea values (kine keeps values so).
var byteaPattern = regexp.MustCompile(`\\x([0-9a-f]+)`)

// decodeBytea returns the dump followed by every bytea value it holds, decoded.
func decodeBytea(dump []byte) []byte {
	out := bytes.Clone(dump)
	for _, m := range byteaPattern.FindAllSubmatch(dump, -1) {
		if b, err := hex.DecodeString(string(m[1])); err == nil {
			out = append(out, '\n')
			out = append(out, b...)
		}
	}
	return out
}
