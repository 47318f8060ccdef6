package node_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sovra-dev/sovra/agent/config"
	"github.com/sovra-dev/sovra/agent/controllers/ctest"
	nodectrl "github.com/sovra-dev/sovra/agent/controllers/node"
	"github.com/sovra-dev/sovra/agent/resources/node"
	"github.com/sovra-dev/sovra/agent/runtime/clock"
)

// flakyReader fails a few times before answering.
type flakyReader struct {
	failures atomic.Int32
	answer   string
}

func (f *flakyReader) MachineType(context.Context) (string, error) {
	if f.failures.Add(-1) >= 0 {
		return "", errors.New("connection refused")
	}

	return f.answer, nil
}

func TestRoleFromTalosAfterRetries(t *testing.T) {
	reader := &flakyReader{answer: "controlplane"}
	reader.failures.Store(2)

	clk := clock.NewFake(time.Unix(0, 0))
	st := ctest.Start(t, &nodectrl.RoleController{Role: config.RoleAuto, Reader: reader, Clock: clk, RetryInterval: time.Second})

	go func() {
		for range 200 {
			time.Sleep(5 * time.Millisecond)
			clk.Advance(time.Second)
		}
	}()

	got := ctest.WaitFor(t, st, node.NewRole().Metadata(), func(*node.Role) bool { return true })
	if s := got.TypedSpec(); !s.ControlPlane || s.Source != "talos" {
		t.Fatalf("role %+v", s)
	}
}

func TestRoleFromConfig(t *testing.T) {
	st := ctest.Start(t, &nodectrl.RoleController{Role: config.RoleWorker, Clock: clock.Real{}})

	got := ctest.WaitFor(t, st, node.NewRole().Metadata(), func(*node.Role) bool { return true })
	if s := got.TypedSpec(); s.ControlPlane || s.MachineType != "worker" || s.Source != "config" {
		t.Fatalf("role %+v", s)
	}
}
