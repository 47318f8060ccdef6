package swtpm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/sovra-dev/sovra/internal/testutil"
)

// TestReadFramesSplitResponses: a response that arrives in pieces is read
// whole, as go-tpm expects from one Read.
func TestReadFramesSplitResponses(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	resp := make([]byte, 30)
	binary.BigEndian.PutUint16(resp, 0x8001)
	binary.BigEndian.PutUint32(resp[2:], uint32(len(resp)))
	for i := 10; i < len(resp); i++ {
		resp[i] = byte(i)
	}
	go func() {
		for _, part := range [][]byte{resp[:3], resp[3:12], resp[12:]} {
			_, _ = server.Write(part)
		}
	}()
	c := &conn{Conn: client}
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil || !bytes.Equal(buf[:n], resp) {
		t.Fatalf("Read = %d bytes, %v", n, err)
	}
}

func TestReadRejectsBadSize(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	go func() { _, _ = server.Write([]byte{0x80, 0x01, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}) }()
	if _, err := (&conn{Conn: client}).Read(make([]byte, 64)); err == nil {
		t.Fatal("a response claiming 4 GiB was accepted")
	}
}

// TestSwtpm talks to a real swtpm in socket mode.
func TestSwtpm(t *testing.T) {
	testutil.Require(t, "swtpm")
	dir := t.TempDir()
	port := testutil.FreePort(t)
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", testutil.FreePort(t)),
		"--flags", "not-need-init,startup-clear")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	s := TCP{Addr: fmt.Sprintf("127.0.0.1:%d", port)}
	var rw io.ReadWriteCloser
	var err error
	for range 100 {
		if rw, err = s.Open(); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	b, err := tpm2.GetRandom(rw, 16)
	if err != nil || len(b) != 16 {
		t.Fatalf("GetRandom = %x, %v", b, err)
	}
}
