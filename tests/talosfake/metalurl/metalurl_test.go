package metalurl_test

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/state"
	"github.com/cosi-project/runtime/pkg/state/impl/inmem"
	"github.com/cosi-project/runtime/pkg/state/impl/namespaced"
	"github.com/siderolabs/talos/pkg/machinery/nethelpers"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"
	"go.uber.org/zap"

	"github.com/sovra-dev/sovra/tests/talosfake/metalurl"
)

const uuid = "4c4c4544-0042-3010-8052-b8c04f4b4d31"

func newState(t *testing.T) state.State {
	t.Helper()

	st := state.WrapCore(namespaced.NewState(inmem.Build))

	si := hardware.NewSystemInformation(hardware.SystemInformationID)
	si.TypedSpec().UUID = uuid

	mac, _ := net.ParseMAC("52:54:00:aa:bb:cc") //nolint:errcheck
	hw := network.NewHardwareAddr(network.NamespaceName, network.FirstHardwareAddr)
	hw.TypedSpec().HardwareAddr = nethelpers.HardwareAddr(mac)

	if err := st.Create(context.Background(), si); err != nil {
		t.Fatal(err)
	}

	if err := st.Create(context.Background(), hw); err != nil {
		t.Fatal(err)
	}

	return st
}

// TestPopulate: variables are replaced only in query values, whatever their
// case; the legacy empty ?uuid= is filled; the query is re-encoded.
func TestPopulate(t *testing.T) {
	st := newState(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	got, err := metalurl.Populate(ctx, "https://boot.example/${uuid}/config?uuid=&u=${UUID}&mac=${mac}&keep=a%20b", st, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}

	want := "https://boot.example/$%7Buuid%7D/config?keep=a+b&mac=52%3A54%3A00%3Aaa%3Abb%3Acc&u=" + uuid + "&uuid=" + uuid
	if got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}

	plain := "https://boot.example/${uuid}/config?x=%2F"
	if got, err := metalurl.Populate(ctx, plain, st, zap.NewNop()); err != nil || got != plain {
		t.Fatalf("a URL without variables in its query: %s %v", got, err)
	}
}

// TestPopulateWaits: a value that is not there yet is waited for; one that
// never comes leaves the URL as it is when the time is up.
func TestPopulateWaits(t *testing.T) {
	st := state.WrapCore(namespaced.NewState(inmem.Build))

	go func() {
		time.Sleep(200 * time.Millisecond)

		si := hardware.NewSystemInformation(hardware.SystemInformationID)
		si.TypedSpec().UUID = uuid

		_ = st.Create(context.Background(), si) //nolint:errcheck
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	got, err := metalurl.Populate(ctx, "https://b/c?uuid=${uuid}", st, zap.NewNop())
	if err != nil || got != "https://b/c?uuid="+uuid {
		t.Fatalf("late UUID: %s %v", got, err)
	}

	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()

	got, err = metalurl.Populate(short, "https://b/c?uuid=${uuid}&s=${serial}", st, zap.NewNop())
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(got, "s=%24%7Bserial%7D") {
		t.Fatalf("missing serial: %s %v", got, err)
	}
}

// TestDownloadRetries: answers other than 200 and TLS failures are retried;
// the body of the first 200 is returned.
func TestDownloadRetries(t *testing.T) {
	var calls atomic.Int32

	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if calls.Add(1) < 3 {
			http.Error(w, "later", http.StatusServiceUnavailable)

			return
		}

		w.Write([]byte("config")) //nolint:errcheck
	}))
	defer srv.Close()

	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())

	opts := metalurl.Options{Roots: roots, Timeout: 20 * time.Second, AttemptTimeout: 5 * time.Second}

	data, err := metalurl.Configuration(context.Background(), srv.URL+"/c?uuid=${uuid}", newState(t), opts)
	if err != nil || string(data) != "config" || calls.Load() != 3 {
		t.Fatalf("download: %q %v after %d calls", data, err, calls.Load())
	}

	// Untrusted: retried until the time is up.
	opts.Roots, opts.Timeout = x509.NewCertPool(), 3*time.Second
	before := calls.Load()

	if _, err := metalurl.Configuration(context.Background(), srv.URL+"/c", newState(t), opts); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("untrusted server: %v", err)
	}

	if calls.Load() != before {
		t.Fatal("an untrusted server got requests")
	}

	if _, err := metalurl.Configuration(context.Background(), "none", newState(t), opts); !errors.Is(err, metalurl.ErrNoConfigSource) {
		t.Fatalf("talos.config=none: %v", err)
	}
}
