package server

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"os"
	"sync/atomic"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
	"k8s.io/apiserver/pkg/server/healthz"
	"k8s.io/client-go/rest"

	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/config"
	"github.com/sovra-dev/sovra/daemon/kms"
)

// The names of sovrad's own readiness checks, as /readyz?verbose lists them.
const (
	checkNodeAPI = "sovra-node-api"
	checkKMS     = "sovra-kms"
	checkCRDs    = "sovra-crds"
)

// readiness is what sovrad adds to the API server's /readyz: the node API
// listens, the KMS's node cache has synced, sovra's CRDs are established.
// A check that does not apply (no node API, no KMS) passes from the start.
type readiness struct {
	nodeAPI, crds *gate
	kms           *kmsCheck
}

func newReadiness(cfg *config.Config) *readiness {
	nodeAPI := cfg.NodeAPI.Listen != ""
	keys := cfg.KMS.MasterKeyFile != ""
	return &readiness{
		nodeAPI: newGate(checkNodeAPI, "the node API is not listening yet", nodeAPI),
		// The node API and the KMS install the CRDs; without either nothing does.
		crds: newGate(checkCRDs, "sovra's CRDs are not established yet", nodeAPI || keys),
		kms:  &kmsCheck{applies: keys},
	}
}

// checks are the readiness checks for the API server.
func (r *readiness) checks() []healthz.HealthChecker {
	return []healthz.HealthChecker{r.nodeAPI, r.kms, r.crds}
}

// apiReadyz is /readyz without sovra's own checks: the API server's own
// readiness, which the node API and the controllers wait for before they
// start (and which sovra's checks in turn wait for).
func apiReadyz() string {
	q := url.Values{}
	for _, name := range []string{checkNodeAPI, checkKMS, checkCRDs} {
		q.Add("exclude", name)
	}
	return "/readyz?" + q.Encode()
}

// waitCRDs opens the CRD check once sovra's CRDs are established (the node
// API or the KMS installs them).
func (r *readiness) waitCRDs(ctx context.Context, loopback *rest.Config) error {
	if r.crds.open.Load() {
		return nil
	}
	c, err := attestationClient(loopback)
	if err != nil {
		return err
	}
	if err := attestation.WaitForCRDs(ctx, c); err != nil {
		return err
	}
	r.crds.Open()
	return nil
}

// gate is a readiness check that fails until it is opened.
type gate struct {
	name, waiting string
	open          atomic.Bool
}

// newGate returns a gate named name that fails with waiting until opened;
// one that does not apply is open from the start.
func newGate(name, waiting string, applies bool) *gate {
	g := &gate{name: name, waiting: waiting}
	g.open.Store(!applies)
	return g
}

func (g *gate) Name() string { return g.name }

func (g *gate) Check(*http.Request) error {
	if g.open.Load() {
		return nil
	}
	return errors.New(g.waiting)
}

// Open makes the check pass.
func (g *gate) Open() { g.open.Store(true) }

// kmsCheck passes once the KMS has synced its node cache (before that it
// answers Unavailable), or when there is no KMS.
type kmsCheck struct {
	applies bool
	keys    atomic.Pointer[kms.Service]
}

func (k *kmsCheck) Name() string { return checkKMS }

func (k *kmsCheck) Check(*http.Request) error {
	if !k.applies {
		return nil
	}
	if keys := k.keys.Load(); keys == nil || !keys.Ready() {
		return errors.New("the KMS has not synced its node cache yet")
	}
	return nil
}

// notifySocket is the environment variable that holds systemd's notify
// socket (Type=notify).
const notifySocket = "NOTIFY_SOCKET"

// takeNotifySocket hides systemd's notify socket from the rest of the
// process and returns it: the API server would say READY=1 as soon as it
// listens, long before sovrad is ready.
func takeNotifySocket() string {
	socket := os.Getenv(notifySocket)
	_ = os.Unsetenv(notifySocket)
	return socket
}

// notifyReady tells systemd on socket (from takeNotifySocket) that sovrad
// is ready; with no socket (not under systemd) it does nothing.
func notifyReady(socket string, log *zap.Logger) {
	if socket == "" {
		return
	}
	// SdNotify reads the socket from the environment and, asked to, clears
	// it again at once.
	_ = os.Setenv(notifySocket, socket)
	if _, err := daemon.SdNotify(true, daemon.SdNotifyReady); err != nil {
		log.Warn("telling systemd that sovrad is ready", zap.Error(err))
	}
}
