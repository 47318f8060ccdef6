package kms

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/custody"
	"github.com/sovra-dev/sovra/internal/testutil"
	"github.com/sovra-dev/sovra/tests/pgtest"
)

const (
	// shredBound is the documented bound (docs/operators.md, "Revoking a
	// node"): this long after `kubectl delete sovranode` returns, no copy
	// of the node's key salt is left where sovrad writes.
	shredBound = 30 * time.Second
	// replacedBound is the documented time (about 70 s: the one-minute
	// periodic compaction, its 5 s settle, and work) within which a value
	// a live record replaced goes, once the record was written again; the
	// test allows some slack on a loaded machine.
	replacedBound = 90 * time.Second
	// shredLogLine is sovrad's log line for each shredded record.
	shredLogLine = "key salt of deleted node record shredded from the datastore"
	// fragment is the length of the pieces of a salt's base64 form looked
	// for in PostgreSQL's files, where pglz compression splits long
	// literals every eight items.
	fragment = 8
	// scanRegion is the unit of work of the window scan.
	scanRegion = 64 << 10
)

// revoked is a node the test revokes: its salt as the admin read it from
// the API, and a key sealed under it.
type revoked struct {
	node       node
	salt, blob []byte
}

// TestShredRevokedNodeSQLite: after `kubectl delete sovranode`, within the
// documented bound, no file sovrad writes (the data directory with its
// SQLite files and audit log, and sovrad's log) holds the node's key salt
// in any encoding, or any 32-byte string that with the master key opens a
// key the node sealed; also when a record of the same name is created
// again at once (the datastore keeps a re-created key's predecessor).
func TestShredRevokedNodeSQLite(t *testing.T) {
	d := startKMS(t)
	gone, again := d.enrollForShredding(t)
	db := filepath.Join(d.DataDir, "db")
	if !filesHold(t, db, gone.salt) {
		t.Fatal("the SQLite files lack the salt before the delete: wrong files?")
	}

	deleted, fresh := d.revoke(t, gone, again)
	clean := waitUntil(t, deleted, func() bool { return !d.anyCopy(t, gone.salt, again.salt) })
	t.Logf("no copy of either salt in the data directory or the logs %s after the delete returned", clean.Round(time.Millisecond))
	d.waitShredLogs(t, gone, again)
	time.Sleep(time.Until(deleted.Add(shredBound)))

	d.assertShredded(t, gone, again)
	if !filesHold(t, db, fresh) {
		t.Fatal("the SQLite files lack the re-created record's live salt: the scan reads the wrong files")
	}
}

// TestShredRevokedNodePostgres: on PostgreSQL, within the bound no row of
// kine's table holds the salt; after the documented VACUUM FULL the
// table's files hold no piece of it either (pg_wal, backups and replicas
// are bounded by the operator's retention, see docs/operators.md).
func TestShredRevokedNodePostgres(t *testing.T) {
	pg := pgtest.Start(t)
	dataDir := filepath.Join(t.TempDir(), "data")
	keyFile := filepath.Join(t.TempDir(), "master.key")
	d := startKMSWith(t, dataDir, keyFile, testutil.FreePort(t), "--datastore", pg.DSN("sovra"))
	gone, again := d.enrollForShredding(t)
	rows := func(salts ...[]byte) int {
		var clauses []string
		for _, s := range salts {
			raw := `'\x` + hex.EncodeToString(s) + `'::bytea`
			b64 := `convert_to('` + base64.StdEncoding.EncodeToString(s) + `', 'UTF8')`
			for _, col := range []string{"value", "old_value"} {
				clauses = append(clauses, fmt.Sprintf("position(%s in %s) > 0", raw, col), fmt.Sprintf("position(%s in %s) > 0", b64, col))
			}
		}
		out := strings.TrimSpace(pg.SQL("sovra", "SELECT count(*) FROM kine WHERE "+strings.Join(clauses, " OR ")))
		n, err := strconv.Atoi(out)
		if err != nil {
			t.Fatalf("counting rows: %q", out)
		}
		return n
	}
	if rows(gone.salt) == 0 {
		t.Fatal("no kine row holds the salt before the delete: wrong query?")
	}

	deleted, fresh := d.revoke(t, gone, again)
	clean := waitUntil(t, deleted, func() bool { return rows(gone.salt, again.salt) == 0 })
	t.Logf("no kine row holds either salt %s after the delete returned", clean.Round(time.Millisecond))
	d.waitShredLogs(t, gone, again)
	time.Sleep(time.Until(deleted.Add(shredBound)))
	if n := rows(gone.salt, again.salt); n != 0 {
		t.Fatalf("%d kine rows hold a revoked salt %s after the delete", n, shredBound)
	}
	if rows(fresh) == 0 {
		t.Fatal("no kine row holds the re-created record's live salt: wrong query?")
	}
	d.assertShredded(t, gone, again)

	// The operator's step (docs/operators.md): rewrite the table, then
	// checkpoint so the old files are gone. The table's files (everything
	// but pg_wal) then hold no piece of a revoked salt, and do hold the
	// live one (so the scan reads the right files, compressed or not).
	pg.SQL("sovra", "VACUUM FULL kine")
	pg.SQL("sovra", "CHECKPOINT")
	start := time.Now()
	for _, r := range []revoked{gone, again} {
		if where := pgFragments(t, pg.DataDir(), r.salt); where != "" {
			t.Fatalf("after VACUUM FULL, %s holds a piece of the salt of revoked node %s", where, r.node.Name)
		}
	}
	if pgFragments(t, pg.DataDir(), fresh) == "" {
		t.Fatal("the PostgreSQL files lack the live salt: the scan reads the wrong files")
	}
	t.Logf("PostgreSQL data directory (without pg_wal) scanned in %s: no piece of a revoked salt", time.Since(start).Round(time.Millisecond))

	// pg_wal holds the rows as they were written until the server cycles
	// its segments; with wal_recycle off (docs/operators.md) the cycling
	// unlinks them instead of keeping them for reuse.
	wal := filepath.Join(pg.DataDir(), "pg_wal")
	if pgFragments(t, wal, gone.salt) == "" {
		t.Fatal("pg_wal lacks the revoked salt before cycling: the scan reads the wrong files")
	}
	pg.SQL("sovra", "ALTER SYSTEM SET wal_recycle = off")
	pg.SQL("sovra", "SELECT pg_reload_conf()")
	for range 2 {
		pg.SQL("sovra", "SELECT pg_switch_wal()")
		pg.SQL("sovra", "CHECKPOINT")
	}
	for _, r := range []revoked{gone, again} {
		if where := pgFragments(t, wal, r.salt); where != "" {
			t.Fatalf("after cycling the WAL, %s holds a piece of the salt of revoked node %s", where, r.node.Name)
		}
	}
}

// TestShredReplacedSaltSQLite: a salt a live record replaced (a rotation)
// is gone from the files within the documented time after the record's
// next write, by the periodic compaction: no delete is involved.
func TestShredReplacedSaltSQLite(t *testing.T) {
	ctx := context.Background()
	d := startKMS(t)
	n := newNode(t)
	if err := d.createNode(ctx, n, attestedNode); err != nil {
		t.Fatal(err)
	}
	d.sealEventually(ctx, n, key(t))
	old := d.adminSalt(t, n)
	rec := d.getNode(ctx, n)
	rec.Status.KeySalt = key(t)
	if err := d.kube.Status().Update(ctx, rec); err != nil {
		t.Fatalf("replacing the salt: %v", err)
	}
	// The record's next write: until then its current row keeps the
	// previous version (with the old salt) beside the current one.
	d.Kubectl("annotate", "sovranode", n.Name, "test.sovra.dev/touched=yes")
	written := time.Now()
	if !filesHold(t, filepath.Join(d.DataDir, "db"), old) {
		t.Fatal("the SQLite files lack the replaced salt: wrong files?")
	}
	for d.anyCopy(t, old) {
		if time.Since(written) > replacedBound {
			t.Fatalf("a copy of the replaced salt is left %s after the record's next write", replacedBound)
		}
		time.Sleep(time.Second)
	}
	t.Logf("no copy of the replaced salt %s after the record's next write", time.Since(written).Round(time.Millisecond))
}

// TestAuditPolicyMustKeepNodesAtMetadata: sovrad refuses to start, as a
// configuration error, with an audit policy that would record SovraNodes'
// bodies, and says what to add.
func TestAuditPolicyMustKeepNodesAtMetadata(t *testing.T) {
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n  - level: RequestResponse\n    resources:\n      - group: sovra.dev\n  - level: Metadata\n"), 0o600)
	data := filepath.Join(dir, "data")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, testutil.Bin(t, "sovrad"), "--data-dir", data, "--audit-policy", policy).CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("sovrad: %v, want exit code 2:\n%s", err, out)
	}
	for _, want := range []string{"--audit-policy " + policy + ": rule 1 records SovraNodes at level RequestResponse",
		`resources: ["sovranodes", "sovranodes/*"]`} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(data); err == nil {
		t.Fatal("a refused start created the data directory")
	}
}

// enrollForShredding enrolls two nodes, seals a key for each, and reads
// each salt as the admin reads it (kubectl). The reads are recorded in the
// audit log at Metadata, without the salt, and the records carry the shred
// finalizer.
func (k *kmsDaemon) enrollForShredding(t *testing.T) (revoked, revoked) {
	t.Helper()
	ctx := context.Background()
	audit := filepath.Join(k.DataDir, "audit.log")
	var out []revoked
	for range 2 {
		n := newNode(t)
		if err := k.createNode(ctx, n, attestedNode); err != nil {
			t.Fatal(err)
		}
		data := key(t)
		blob := k.sealEventually(ctx, n, data)
		if got := k.unsealEventually(ctx, n, blob); !bytes.Equal(got, data) {
			t.Fatal("unsealed other data")
		}
		from := size(t, audit)
		salt := k.adminSalt(t, n)
		k.waitAudited(t, audit, from, n)
		k.waitFinalizer(t, n)
		out = append(out, revoked{node: n, salt: salt, blob: blob})
	}
	return out[0], out[1]
}

// adminSalt reads n's salt with kubectl, as an operator would.
func (k *kmsDaemon) adminSalt(t *testing.T, n node) []byte {
	t.Helper()
	b64 := k.Kubectl("get", "sovranode", n.Name, "-o", "jsonpath={.status.keySalt}")
	salt, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(salt) != custody.SaltSize {
		t.Fatalf("salt of %s: %d bytes, %v", n.Name, len(salt), err)
	}
	return salt
}

// auditEvent is the part of an audit log line the test reads.
type auditEvent struct {
	Level     string `json:"level"`
	Verb      string `json:"verb"`
	ObjectRef *struct {
		Resource string `json:"resource"`
		Name     string `json:"name"`
	} `json:"objectRef"`
}

// waitAudited waits for the audit log (from offset from) to record the
// admin's get of n at Metadata, and finds no SovraNode recorded above it.
func (k *kmsDaemon) waitAudited(t *testing.T, path string, from int64, n node) {
	t.Helper()
	deadline := time.Now().Add(converge)
	for {
		var seen bool
		for _, e := range auditEvents(t, path, from) {
			if e.ObjectRef == nil || e.ObjectRef.Resource != "sovranodes" {
				continue
			}
			if e.Level != "Metadata" {
				t.Fatalf("the audit log records a SovraNode %s at level %s", e.Verb, e.Level)
			}
			seen = seen || e.Verb == "get" && e.ObjectRef.Name == n.Name
		}
		if seen {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the audit log does not record the admin's get of %s", n.Name)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func auditEvents(t *testing.T, path string, from int64) []auditEvent {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(from, 0); err != nil {
		t.Fatal(err)
	}
	var out []auditEvent
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var e auditEvent
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

func (k *kmsDaemon) waitFinalizer(t *testing.T, n node) {
	t.Helper()
	deadline := time.Now().Add(converge)
	for !slicesContains(k.getNode(context.Background(), n).Finalizers, v1alpha1.FinalizerShred) {
		if time.Now().After(deadline) {
			t.Fatalf("record %s holds a salt but not the finalizer %s", n.Name, v1alpha1.FinalizerShred)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// revoke deletes both records with kubectl, then at once creates the
// second again under the same name (its EK enrolls again) and seals for
// it, which gives it a fresh salt. The old key no longer opens. It returns
// when the delete returned, and the fresh salt.
func (k *kmsDaemon) revoke(t *testing.T, gone, again revoked) (time.Time, []byte) {
	t.Helper()
	ctx := context.Background()
	k.Kubectl("delete", "sovranode", gone.node.Name, again.node.Name)
	deleted := time.Now()
	if err := k.createNode(ctx, again.node, attestedNode); err != nil {
		t.Fatal(err)
	}
	k.sealEventually(ctx, again.node, key(t))
	fresh := k.getNode(ctx, again.node).Status.KeySalt
	if len(fresh) != custody.SaltSize || bytes.Equal(fresh, again.salt) {
		t.Fatalf("the re-created record's salt: %d bytes, same as before: %v", len(fresh), bytes.Equal(fresh, again.salt))
	}
	data, err := k.Unseal(ctx, again.node.UUID, again.blob)
	requireDenied(t, data, err)
	return deleted, fresh
}

// waitShredLogs waits for sovrad's log line about each shredded record.
func (k *kmsDaemon) waitShredLogs(t *testing.T, nodes ...revoked) {
	t.Helper()
	deadline := time.Now().Add(shredBound)
	for _, r := range nodes {
		for {
			line := logLine(k.Log, shredLogLine, `"node":"`+r.node.Name+`"`)
			if line != "" {
				t.Logf("sovrad: %s", line)
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no shred log line for %s:\n%s", r.node.Name, k.Tail(30))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func logLine(path string, parts ...string) string {
	data, _ := os.ReadFile(path)
	for _, line := range strings.Split(string(data), "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			return line
		}
	}
	return ""
}

// waitUntil polls ok until it holds, failing once shredBound has passed
// since start, and returns how long after start it held.
func waitUntil(t *testing.T, start time.Time, ok func() bool) time.Duration {
	t.Helper()
	for !ok() {
		if time.Since(start) > shredBound {
			t.Fatalf("still a copy %s after the delete", shredBound)
		}
		time.Sleep(250 * time.Millisecond)
	}
	return time.Since(start)
}

// shredFiles are the files to search: every regular file in the data
// directory (the datastore, the audit log and its backups, keys,
// configuration) and sovrad's log.
func (k *kmsDaemon) shredFiles(t *testing.T) []string {
	t.Helper()
	files := []string{k.Log}
	err := filepath.WalkDir(k.DataDir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.Type().IsRegular() {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// anyCopy reports whether a file to search holds any encoding of a salt.
func (k *kmsDaemon) anyCopy(t *testing.T, salts ...[]byte) bool {
	t.Helper()
	for _, f := range k.shredFiles(t) {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range salts {
			if _, ok := findSecret(data, s); ok {
				return true
			}
		}
	}
	return false
}

// assertShredded searches every file sovrad writes for the revoked salts
// in any encoding, and tries every 32-byte window of each file, and of
// each base64 or hex string in it decoded, as the salt of each revoked
// node's blob with the master keyring: none may open.
func (k *kmsDaemon) assertShredded(t *testing.T, nodes ...revoked) {
	t.Helper()
	keyring, err := custody.LoadKeyring(k.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var total int64
	var regions [][]byte
	for _, f := range k.shredFiles(t) {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		total += int64(len(data))
		for _, r := range nodes {
			if enc, ok := findSecret(data, r.salt); ok {
				t.Fatalf("%s holds the salt of revoked node %s (%s)", f, r.node.Name, enc)
			}
		}
		for _, c := range decodedTokens(data) {
			regions = append(regions, split(c)...)
		}
		regions = append(regions, split(data)...)
	}
	tried, opened := openWindows(regions, keyring, nodes)
	if opened != "" {
		t.Fatalf("a 32-byte string in the files opens the key of revoked node %s", opened)
	}
	t.Logf("scanned %d files (%d bytes): no copy of a revoked salt; %d windows tried as salts opened nothing; took %s",
		len(k.shredFiles(t)), total, tried, time.Since(start).Round(time.Millisecond))
}

// decodedTokens are the base64 and hex strings of data, decoded, that are
// long enough to hold a salt.
func decodedTokens(data []byte) [][]byte {
	var out [][]byte
	for _, tok := range bytes.FieldsFunc(data, func(r rune) bool { return !isBase64(r) }) {
		if len(tok) < 43 {
			continue
		}
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding} {
			if dec, err := enc.DecodeString(string(tok)); err == nil && len(dec) >= custody.SaltSize {
				out = append(out, dec)
			}
		}
	}
	isHex := func(r rune) bool { return r >= '0' && r <= '9' || r >= 'a' && r <= 'f' || r >= 'A' && r <= 'F' }
	for _, tok := range bytes.FieldsFunc(data, func(r rune) bool { return !isHex(r) }) {
		if len(tok) < 2*custody.SaltSize {
			continue
		}
		if dec, err := hex.DecodeString(string(tok[:len(tok)&^1])); err == nil {
			out = append(out, dec)
		}
	}
	return out
}

// split cuts data into overlapping regions, so that every 32-byte window
// lies whole in one.
func split(data []byte) [][]byte {
	var out [][]byte
	for i := 0; i+custody.SaltSize <= len(data); i += scanRegion {
		out = append(out, data[i:min(len(data), i+scanRegion+custody.SaltSize-1)])
	}
	return out
}

// openWindows tries every 32-byte window of the regions as each node's
// salt, in parallel; it returns the windows tried and the node whose blob
// one opened ("" when none did). A window equal to the one before it (a
// run of one byte, as SQLite's zeroed pages) is tried once.
func openWindows(regions [][]byte, keyring *custody.Keyring, nodes []revoked) (int64, string) {
	var tried atomic.Int64
	var mu sync.Mutex
	opened := ""
	work := make(chan []byte)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var n int64
			for region := range work {
				var prev []byte
				for i := 0; i+custody.SaltSize <= len(region); i++ {
					w := region[i : i+custody.SaltSize]
					if prev != nil && bytes.Equal(w, prev) {
						continue
					}
					prev = w
					n++
					for _, r := range nodes {
						if _, err := keyring.Open(w, r.node.UUID, r.blob); err == nil {
							mu.Lock()
							opened = r.node.Name
							mu.Unlock()
						}
					}
				}
			}
			tried.Add(n)
		}()
	}
	for _, r := range regions {
		work <- r
	}
	close(work)
	wg.Wait()
	return tried.Load(), opened
}

// filesHold reports whether a file under dir holds the base64 form of salt.
func filesHold(t *testing.T, dir string, salt []byte) bool {
	t.Helper()
	b64 := []byte(base64.StdEncoding.EncodeToString(salt))
	found := false
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() || found {
			return err
		}
		data, err := os.ReadFile(path)
		found = err == nil && bytes.Contains(data, b64)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// pgFragments returns a file under dir (PostgreSQL's data directory or a
// part of it; pg_wal only when dir is pg_wal itself) that holds a piece of
// salt's base64 form ("" when none does). Pieces, because pglz compression
// of a large row interleaves its literal bytes with a control byte every
// eight.
func pgFragments(t *testing.T, dir string, salt []byte) string {
	t.Helper()
	b64 := base64.StdEncoding.EncodeToString(salt)
	b64 = strings.TrimRight(b64, "=")
	where := ""
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil || where != "" {
			return err
		}
		if e.IsDir() && e.Name() == "pg_wal" && path != dir {
			return filepath.SkipDir
		}
		if !e.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for i := 0; i+fragment <= len(b64); i++ {
			if bytes.Contains(data, []byte(b64[i:i+fragment])) {
				where = path
				return nil
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return where
}

func size(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
