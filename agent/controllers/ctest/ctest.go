// Package ctest runs controllers in the real COSI runtime on in-memory state
// for the controllers' tests, and waits for their outputs.
package ctest

import (
	"context"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/controller"
	"github.com/cosi-project/runtime/pkg/controller/runtime"
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/cosi-project/runtime/pkg/state/impl/inmem"
	"github.com/cosi-project/runtime/pkg/state/impl/namespaced"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// waitTimeout bounds every wait of a test.
const waitTimeout = 10 * time.Second

// Start runs ctrls on a fresh in-memory state until the test ends and
// returns the state.
func Start(t *testing.T, ctrls ...controller.Controller) state.State {
	t.Helper()

	return StartLogged(t, zaptest.NewLogger(t), ctrls...)
}

// StartLogged is Start with the runtime's (and so the controllers') logger;
// tests that check what is logged pass one that writes to a buffer.
func StartLogged(t *testing.T, logger *zap.Logger, ctrls ...controller.Controller) state.State {
	t.Helper()

	st := state.WrapCore(namespaced.NewState(inmem.Build))

	rt, err := runtime.NewRuntime(st, logger)
	if err != nil {
		t.Fatal(err)
	}

	for _, c := range ctrls {
		if err := rt.RegisterController(c); err != nil {
			t.Fatal(err)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})

	go func() {
		defer close(done)

		if err := rt.Run(ctx); err != nil {
			t.Errorf("runtime: %v", err)
		}
	}()

	t.Cleanup(func() {
		cancel()
		<-done
	})

	return st
}

// Started is a running runtime's state, for helpers that keep it.
type Started struct {
	State state.State
}

// Put creates or replaces a resource.
func Put[R resource.Resource](t *testing.T, st state.State, r R) {
	t.Helper()

	ctx := context.Background()

	cur, err := st.Get(ctx, r.Metadata())
	if err == nil {
		r.Metadata().SetVersion(cur.Metadata().Version())
		err = st.Update(ctx, r)
	} else if state.IsNotFoundError(err) {
		err = st.Create(ctx, r)
	}

	if err != nil {
		t.Fatal(err)
	}
}

// WaitFor waits until the resource at md exists and cond holds for it, and
// returns it.
func WaitFor[R resource.Resource](t *testing.T, st state.State, md resource.Pointer, cond func(R) bool) R {
	t.Helper()

	deadline := time.Now().Add(waitTimeout)

	for {
		r, err := safe.StateGet[R](context.Background(), st, md)
		if err == nil && cond(r) {
			return r
		}

		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s (last: %v, err %v)", md, r, err)
		}

		time.Sleep(5 * time.Millisecond)
	}
}
