// Package pgtest runs a real, private PostgreSQL server for a test: its own
// cluster in a temporary directory, listening on a free loopback port, with a
// password-protected role, stopped and removed when the test ends.
package pgtest

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/internal/testutil"
)

const (
	// Role and Password are the credentials of the test's database role.
	Role     = "sovra"
	Password = "pg-test-password-7c1e"
	// serverUser runs the server when the tests run as root (PostgreSQL
	// refuses to): the account Debian's postgresql package creates.
	serverUser   = "postgres"
	startTimeout = 60 * time.Second
)

// Server is a running PostgreSQL.
type Server struct {
	t    testing.TB
	dir  string
	bin  string
	Port int
	cmd  *exec.Cmd
	done chan error
}

// Start initialises and starts a PostgreSQL cluster. It skips the test (fails
// it under CI) when PostgreSQL is not installed.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := binDir()
	if bin == "" {
		testutil.Require(t, "initdb") // skips or fails with the reason
	}
	dir, err := os.MkdirTemp("", "sovra-pg-")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, dir: dir, bin: bin}
	t.Cleanup(func() {
		s.Stop()
		os.RemoveAll(dir)
	})
	pwfile := filepath.Join(dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	s.chownToServerUser(dir, pwfile)
	s.run("initdb", "-D", data, "-U", Role, "--pwfile", pwfile, "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")
	s.Port = testutil.FreePort(t)
	s.Start()
	return s
}

// DSN is the URL sovrad's --datastore takes for database name db.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("postgres://%s:%s@127.0.0.1:%d/%s?sslmode=disable", Role, Password, s.Port, db)
}

// Start starts the server (again, after Stop) and waits until it accepts connections.
func (s *Server) Start() {
	s.t.Helper()
	args := []string{"-D", filepath.Join(s.dir, "data"), "-p", strconv.Itoa(s.Port), "-k", s.dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"}
	s.cmd = s.command("postgres", args...)
	logFile, err := os.OpenFile(filepath.Join(s.dir, "postgres.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		s.t.Fatal(err)
	}
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("starting postgres: %v", err)
	}
	s.done = make(chan error, 1)
	go func() { s.done <- s.cmd.Wait(); logFile.Close() }()
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		out, err := s.command("pg_isready", "-h", "127.0.0.1", "-p", strconv.Itoa(s.Port)).CombinedOutput()
		if err == nil {
			return
		}
		select {
		case err := <-s.done:
			s.t.Fatalf("postgres exited: %v: %s", err, out)
		case <-time.After(100 * time.Millisecond):
		}
	}
	s.t.Fatal("postgres did not accept connections in time")
}

// Stop shuts the server down (fast shutdown: open connections are cut).
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd = nil
}

// Dump returns a plain-text pg_dump of database db.
func (s *Server) Dump(db string) []byte {
	s.t.Helper()
	cmd := s.command("pg_dump", "-h", s.dir, "-p", strconv.Itoa(s.Port), "-U", Role, "-d", db)
	out, err := cmd.Output()
	if err != nil {
		s.t.Fatalf("pg_dump: %v", err)
	}
	return out
}

// DataDir is the cluster's data directory.
func (s *Server) DataDir() string { return filepath.Join(s.dir, "data") }

// SQL runs statements with psql on database db, as the test's role, and
// returns the rows (unaligned, without headers).
func (s *Server) SQL(db, sql string) string {
	s.t.Helper()
	cmd := s.command("psql", "-h", s.dir, "-p", strconv.Itoa(s.Port), "-U", Role, "-d", db,
		"-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql)
	out, err := cmd.CombinedOutput()
	if err != nil {
		s.t.Fatalf("psql: %v: %s", err, out)
	}
	return string(out)
}

func (s *Server) run(name string, args ...string) {
	s.t.Helper()
	if out, err := s.command(name, args...).CombinedOutput(); err != nil {
		s.t.Fatalf("%s: %v: %s", name, err, out)
	}
}

// command runs a PostgreSQL program, as the server user when we are root.
// The process runs under that user's credentials directly (not through
// runuser), so the signals Stop sends reach the server itself.
func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.bin, name), args...)
	if os.Geteuid() == 0 {
		uid, gid := s.serverUser()
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
		cmd.Dir = s.dir
	}
	return cmd
}

// serverUser returns the uid and gid of the account that runs PostgreSQL.
func (s *Server) serverUser() (uint32, uint32) {
	u, err := user.Lookup(serverUser)
	if err != nil {
		s.t.Fatalf("running PostgreSQL as root needs the %q user (apt install postgresql): %v", serverUser, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uint32(uid), uint32(gid)
}

func (s *Server) chownToServerUser(paths ...string) {
	if os.Geteuid() != 0 {
		return
	}
	uid, gid := s.serverUser()
	for _, p := range paths {
		if err := os.Chown(p, int(uid), int(gid)); err != nil {
			s.t.Fatal(err)
		}
	}
}

// binDir finds PostgreSQL's programs: Debian keeps them out of PATH, under
// /usr/lib/postgresql/<version>/bin; the newest version wins.
func binDir() string {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	sort.Strings(matches)
	if len(matches) > 0 {
		return filepath.Dir(matches[len(matches)-1])
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p)
	}
	return ""
}
