package attestation

import (
	"context"
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/internal/attest"
)

// deny logs and records a refusal about a node that may not exist yet. Every
// refusal is logged; its event is throttled per node and reason, so a flood
// of bad requests cannot flood the API with events.
func (s *Service) deny(ctx context.Context, node, reason string, err error) {
	s.logger.Warn("denied", zap.String("node", node), zap.String("reason", reason), zap.Error(err))
	if !s.throttle.allow(node+"/"+reason+"/"+err.Error(), s.clock.Now()) {
		return
	}
	ref := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: node}}
	if existing, gerr := s.store.GetNode(ctx, node); gerr == nil {
		ref = existing
	}
	s.store.Event(ctx, ref, true, reason, err.Error())
}

// eventThrottle lets one event per key through per eventInterval.
type eventThrottle struct {
	mu   sync.Mutex // guards last
	last map[string]time.Time
}

const (
	// eventInterval is the shortest time between two equal refusal events.
	eventInterval = 10 * time.Second
	// maxThrottleKeys bounds the throttle's memory; past it, it starts over.
	maxThrottleKeys = 10000
)

func (t *eventThrottle) allow(key string, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.last == nil || len(t.last) >= maxThrottleKeys {
		t.last = map[string]time.Time{}
	}
	if prev, ok := t.last[key]; ok && now.Sub(prev) < eventInterval {
		return false
	}
	t.last[key] = now
	return true
}

func ekPKIX(ek *attest.EK) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(ek.Public)
	if err != nil {
		return nil, fmt.Errorf("encoding EK public key: %w", err)
	}
	return der, nil
}

func checkNodeName(node string) error {
	if errs := validation.IsDNS1123Subdomain(node); len(errs) > 0 {
		return fmt.Errorf("%w: node name %q: %v", ErrInvalid, node, errs[0])
	}
	return nil
}
