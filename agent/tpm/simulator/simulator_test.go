//go:build tpmsimulator

package simulator

import (
	"testing"

	"github.com/google/go-tpm/legacy/tpm2"
)

func TestSimulator(t *testing.T) {
	s, err := New(1)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rw, err := s.Open()
	if err != nil {
		t.Fatal(err)
	}
	if err := rw.Close(); err != nil {
		t.Fatal(err)
	}
	if b, err := tpm2.GetRandom(rw, 16); err != nil || len(b) != 16 {
		t.Fatalf("GetRandom after closing the channel = %x, %v: the simulator must keep running", b, err)
	}
}
