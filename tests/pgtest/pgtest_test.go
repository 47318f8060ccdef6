package pgtest

import (
	"net"
	"strconv"
	"testing"
	"time"
)

// TestStopStopsTheServer: the fault stories rely on Stop really taking the
// database away, and on Start bringing it back with its data.
func TestStopStopsTheServer(t *testing.T) {
	s := Start(t)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port))
	s.Stop()
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("PostgreSQL still accepts connections after Stop")
	}
	s.Start()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatalf("PostgreSQL did not come back: %v", err)
	}
	c.Close()
}
