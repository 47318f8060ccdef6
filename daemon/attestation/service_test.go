package attestation

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	goattest "github.com/google/go-attestation/attest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/nodeauth"
	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/attest/attesttest"
)

type testClock struct {
	mu  sync.Mutex // guards now
	now time.Time
}

func (c *testClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

type env struct {
	svc   *Service
	kube  client.Client
	store *KubeStore
	clock *testClock
	f     *attesttest.Fixture
}

func newEnv(t testing.TB, logger *zap.Logger) *env {
	t.Helper()
	f, err := attesttest.Load()
	if err != nil {
		t.Fatal(err)
	}
	s, err := Scheme()
	if err != nil {
		t.Fatal(err)
	}
	kube := fake.NewClientBuilder().WithScheme(s).WithStatusSubresource(&v1alpha1.SovraNode{}).
		WithInterceptorFuncs(interceptor.Funcs{Create: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.CreateOption) error {
			// The API server gives every object a UID; the fake does not.
			if obj.GetUID() == "" {
				obj.SetUID(types.UID(fmt.Sprintf("uid-%s-%d", obj.GetName(), time.Now().UnixNano())))
			}
			return c.Create(ctx, obj, opts...)
		}}).Build()
	store := &KubeStore{Client: kube, Logger: logger}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AppendCertsFromPEM(f.EKRootPEM)
	inter.AppendCertsFromPEM(f.EKIntermediatePEM)
	// The node CA key of the daemon that issued the fixture's nonce, so the
	// fixture's quote is over a nonce this service accepts, at the time it
	// was issued.
	k, err := x509.ParsePKCS8PrivateKey(f.NodeCAKey)
	if err != nil {
		t.Fatal(err)
	}
	caKey := k.(*ecdsa.PrivateKey)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "node CA"},
		NotBefore: f.IssuedAt.Add(-time.Hour), NotAfter: f.IssuedAt.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(der)
	clk := &testClock{now: f.IssuedAt}
	svc, err := New(Config{EK: attest.EKPolicy{Roots: roots, Intermediates: inter}, NodeCA: ca, NodeCAKey: caKey}, store, clk, logger)
	if err != nil {
		t.Fatal(err)
	}
	return &env{svc: svc, kube: kube, store: store, clock: clk, f: f}
}

func (e *env) enrollRequest() EnrollRequest {
	return EnrollRequest{
		EKCertificate: e.f.EKCertificate,
		AK: goattest.AttestationParameters{Public: e.f.AKPublic, CreateData: e.f.AKCreateData,
			CreateAttestation: e.f.AKCreateAttestation, CreateSignature: e.f.AKCreateSignature},
		UUID: "4c4c4544-0042-3510-8051-b7c04f4e3332", Hostname: "node-1", Addresses: []string{"10.0.0.1"}, Peer: "10.0.0.9:4000",
	}
}

// enroll plays the TPM's part with the secret the service keeps.
func (e *env) enroll(t testing.TB) *v1alpha1.SovraNode {
	t.Helper()
	en, _, err := e.svc.BeginEnrollment(context.Background(), e.enrollRequest())
	if err != nil {
		t.Fatal(err)
	}
	n, err := e.svc.FinishEnrollment(context.Background(), en, en.secret)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// nonce forgets that the fixture's nonce was used, so that the recorded
// quote over it can attest again (as a fresh nonce would).
func (e *env) nonce(t testing.TB) {
	t.Helper()
	m := &v1alpha1.AttestationNonce{ObjectMeta: metav1.ObjectMeta{Name: NonceName(e.f.Nonce)}}
	if err := e.kube.Delete(context.Background(), m); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
}

func (e *env) attestRequest(node string) AttestRequest {
	return AttestRequest{Node: node, Nonce: e.f.Nonce, Claims: e.f.Claims, Quote: e.f.Quote, Signature: e.f.Signature,
		PCRHash: uint16(attest.QuoteHash), PCRs: e.f.PCRs, EventLog: e.f.EventLog, CSR: e.f.CSR}
}

func TestEnrollAndAttest(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	n := e.enroll(t)
	if n.Status.EnrollmentMethod != attest.EKByCertificate || !strings.HasPrefix(n.Name, "ek-") {
		t.Fatalf("enrolled %s by %s", n.Name, n.Status.EnrollmentMethod)
	}
	if got := n.Spec.Addresses; len(got) != 2 || got[1] != "10.0.0.9" {
		t.Errorf("addresses = %v, want the claimed one and the peer", got)
	}
	res, err := e.svc.Attest(ctx, e.attestRequest(n.Name))
	if err != nil {
		t.Fatalf("Attest: %v", err)
	}
	leaf, err := x509.ParseCertificate(res.Chain[0])
	if err != nil || leaf.Subject.CommonName != n.Name || leaf.NotAfter.Sub(e.clock.Now()) > DefaultCertTTL {
		t.Fatalf("certificate: %v %v", err, leaf)
	}
	n, _ = e.store.GetNode(ctx, n.Name)
	// The credential names this instance of the record and the reported boot.
	cred, err := nodeauth.Parse(leaf)
	boot := n.CurrentBoot()
	if err != nil || cred.UID != n.UID || boot == nil || cred.Boot != boot.ID || boot.Result != v1alpha1.ResultPassed {
		t.Fatalf("credential %+v (%v) for record %s with boot %+v", cred, err, n.UID, boot)
	}
	if !meta.IsStatusConditionTrue(n.Status.Conditions, v1alpha1.ConditionAttested) || n.Status.LastAttestationResult != v1alpha1.ResultPassed {
		t.Fatalf("status after passing: %+v", n.Status)
	}
	var events corev1.EventList
	if err := e.kube.List(ctx, &events); err != nil {
		t.Fatal(err)
	}
	reasons := map[string]bool{}
	for _, ev := range events.Items {
		reasons[ev.Reason] = true
	}
	if !reasons["Enrolled"] || !reasons[v1alpha1.ReasonAttestationPassed] {
		t.Errorf("events = %v, want Enrolled and AttestationPassed", reasons)
	}
	// Replaying the same attestation is refused: the nonce was consumed.
	if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); !errors.Is(err, ErrNonce) {
		t.Fatalf("replay = %v, want ErrNonce", err)
	}
}

func TestEnrollmentWrongAnswerStoresNothing(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	en, _, err := e.svc.BeginEnrollment(context.Background(), e.enrollRequest())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.FinishEnrollment(context.Background(), en, make([]byte, 32)); !errors.Is(err, ErrRefused) {
		t.Fatalf("wrong answer = %v, want ErrRefused", err)
	}
	var list v1alpha1.SovraNodeList
	if err := e.kube.List(context.Background(), &list); err != nil || len(list.Items) != 0 {
		t.Fatalf("records after a refused enrollment: %d (%v)", len(list.Items), err)
	}
}

func TestReEnrollmentResetsAttestation(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	n := e.enroll(t)
	if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); err != nil {
		t.Fatal(err)
	}
	n = e.enroll(t)
	if meta.IsStatusConditionTrue(n.Status.Conditions, v1alpha1.ConditionAttested) {
		t.Fatal("a new AK must attest again before the node counts as attested")
	}
}

// TestPreRegisteredNode: an operator creates a node's record before it
// enrolls (with only its EK hash, to label it with its cluster). Until the
// node enrolls it cannot attest (NotFound, on which the agent enrolls);
// enrollment pins the AK and keeps the operator's labels.
func TestPreRegisteredNode(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	en, _, err := e.svc.BeginEnrollment(ctx, e.enrollRequest())
	if err != nil {
		t.Fatal(err)
	}
	pre := &v1alpha1.SovraNode{
		ObjectMeta: metav1.ObjectMeta{Name: en.Node, Labels: map[string]string{"sovra.dev/cluster": "prod"}},
		Spec:       v1alpha1.SovraNodeSpec{EKHash: en.ek.Hash},
	}
	if err := e.kube.Create(ctx, pre); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Attest(ctx, e.attestRequest(en.Node)); !errors.Is(err, ErrNodeNotFound) || !strings.Contains(err.Error(), "enroll first") {
		t.Fatalf("attesting a pre-registered node = %v, want ErrNodeNotFound (enroll first)", err)
	}
	n, err := e.svc.FinishEnrollment(ctx, en, en.secret)
	if err != nil {
		t.Fatal(err)
	}
	if n.Labels["sovra.dev/cluster"] != "prod" || len(n.Spec.AKPublic) == 0 {
		t.Fatalf("after enrollment: labels %v, AK %d bytes; want the label kept and the AK pinned", n.Labels, len(n.Spec.AKPublic))
	}
	if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); err != nil {
		t.Fatalf("attesting after enrollment: %v", err)
	}
}

func TestNonceSingleUseAcrossCallers(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	n := e.enroll(t)
	exp, err := e.svc.checkNonce(n.Name, e.f.Nonce)
	if err != nil {
		t.Fatal(err)
	}
	const callers = 8
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted := 0
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := e.svc.useNonce(context.Background(), n.Name, e.f.Nonce, exp); err == nil {
				mu.Lock()
				accepted++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if accepted != 1 {
		t.Fatalf("nonce accepted %d times, want once", accepted)
	}
}

// TestNoncesAreStateless: issuing nonces stores nothing and spends no
// budget, whoever asks and for whichever name; a nonce is good for its node
// only, until it expires; the markers of used nonces are swept once expired.
func TestNoncesAreStateless(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	for i := range 1000 {
		if _, _, err := e.svc.IssueNonce(ctx, "ek-victim"); err != nil {
			t.Fatalf("nonce %d: %v", i, err)
		}
	}
	var markers v1alpha1.AttestationNonceList
	if err := e.kube.List(ctx, &markers); err != nil || len(markers.Items) != 0 {
		t.Fatalf("issuing nonces stored %d objects (%v)", len(markers.Items), err)
	}
	nonce, exp, err := e.svc.IssueNonce(ctx, "ek-a")
	if err != nil || len(nonce) != attest.NonceLen || !exp.After(e.clock.Now()) {
		t.Fatalf("IssueNonce = %x %v %v", nonce, exp, err)
	}
	if _, err := e.svc.checkNonce("ek-a", nonce); err != nil {
		t.Fatalf("own nonce refused: %v", err)
	}
	if _, err := e.svc.checkNonce("ek-b", nonce); !errors.Is(err, ErrNonce) || !strings.Contains(err.Error(), "another node") {
		t.Fatalf("another node's nonce = %v", err)
	}
	forged := slices.Clone(nonce)
	forged[3] ^= 1 // a later expiry
	if _, err := e.svc.checkNonce("ek-a", forged); !errors.Is(err, ErrNonce) {
		t.Fatalf("altered nonce = %v", err)
	}
	if err := e.svc.useNonce(ctx, "ek-a", nonce, exp); err != nil {
		t.Fatal(err)
	}
	e.clock.mu.Lock()
	e.clock.now = e.clock.now.Add(2 * DefaultNonceTTL)
	e.clock.mu.Unlock()
	if _, err := e.svc.checkNonce("ek-a", nonce); !errors.Is(err, ErrNonce) || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired nonce = %v", err)
	}
	if err := e.svc.SweepNonces(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.kube.List(ctx, &markers); err != nil || len(markers.Items) != 0 {
		t.Fatalf("expired markers survived the sweep: %d (%v)", len(markers.Items), err)
	}
}

func TestConfigReportsEveryProblem(t *testing.T) {
	err := Config{NonceTTL: -1}.Validate()
	for _, want := range []string{"nonce TTL", "node CA"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to mention %q", err, want)
		}
	}
}

// BenchmarkService measures, in one run, full enrollments per second
// (EK chain, AK checks, activation challenge and answer, record written) and
// full verifications per second on one core (nonce checked and its use recorded,
// quote verified, log replayed, policy listed and evaluated, certificate
// issued, status written), on the fake API client.
func BenchmarkService(b *testing.B) {
	e := newEnv(b, zap.NewNop())
	ctx := context.Background()
	n := e.enroll(b)
	const rounds = 100
	var enrollTime, verifyTime time.Duration
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		for range rounds {
			en, _, err := e.svc.BeginEnrollment(ctx, e.enrollRequest())
			if err != nil {
				b.Fatal(err)
			}
			if _, err := e.svc.FinishEnrollment(ctx, en, en.secret); err != nil {
				b.Fatal(err)
			}
		}
		enrollTime += time.Since(start)
		start = time.Now()
		for range rounds {
			e.nonce(b)
			if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); err != nil {
				b.Fatal(err)
			}
		}
		verifyTime += time.Since(start)
	}
	total := float64(b.N * rounds)
	b.ReportMetric(total/enrollTime.Seconds(), "enrollments/s")
	b.ReportMetric(total/verifyTime.Seconds(), "verifications/s/core")
}

func TestUUIDStaysBoundToOneEK(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	other := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: "ek-other", Labels: map[string]string{v1alpha1.LabelUUID: e.enrollRequest().UUID}},
		Spec: v1alpha1.SovraNodeSpec{EKHash: strings.Repeat("c", 64), UUID: e.enrollRequest().UUID}}
	if err := e.store.CreateNode(ctx, other); err != nil {
		t.Fatal(err)
	}
	en, _, err := e.svc.BeginEnrollment(ctx, e.enrollRequest())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.FinishEnrollment(ctx, en, en.secret); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "bound to node ek-other") {
		t.Fatalf("enrollment claiming a bound UUID = %v, want ErrRefused", err)
	}
	bad := e.enrollRequest()
	bad.UUID = "not a uuid"
	if _, _, err := e.svc.BeginEnrollment(ctx, bad); !errors.Is(err, ErrInvalid) {
		t.Fatalf("malformed UUID = %v, want ErrInvalid", err)
	}
}

// TestAnyReplicaVerifiesAnyNonce: two services over one API share nonces.
func TestAnyReplicaVerifiesAnyNonce(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	replica2, err := New(e.svc.cfg, e.store, e.clock, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	n := e.enroll(t)
	nonce, _, err := e.svc.IssueNonce(ctx, n.Name)
	if err != nil {
		t.Fatal(err)
	}
	exp, err := replica2.checkNonce(n.Name, nonce)
	if err != nil {
		t.Fatalf("replica 2 refused replica 1's nonce: %v", err)
	}
	if err := replica2.useNonce(ctx, n.Name, nonce, exp); err != nil {
		t.Fatal(err)
	}
	if err := e.svc.useNonce(ctx, n.Name, nonce, exp); !errors.Is(err, ErrNonce) {
		t.Fatalf("replica 1 accepted a nonce replica 2 used: %v", err)
	}
}

func TestTrustOnFirstUseIsLoud(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	e := newEnv(t, zap.New(core))
	cfg := e.svc.cfg
	cfg.EK = attest.EKPolicy{TrustOnFirstUse: true}
	svc, err := New(cfg, e.store, e.clock, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	if logs.FilterMessageSnippet("trust on first use is ON").Len() != 1 {
		t.Fatal("starting in TOFU mode was not logged as a warning")
	}
	req := e.enrollRequest()
	req.EKCertificate = nil
	ek, _ := attest.ParseEK(e.f.EKCertificate, nil)
	req.EKPublic, _ = x509.MarshalPKIXPublicKey(ek.Public)
	if _, _, err := svc.BeginEnrollment(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if logs.FilterMessageSnippet("admitted by trust on first use").Len() != 1 {
		t.Fatal("a TOFU admission was not logged as a warning")
	}
}

// TestUnauthenticatedRefusalsChangeNothing: attestations that fail before
// the pinned AK authenticates them (a bad nonce, a forged quote) create no
// object, no event and no record change, however many there are.
func TestUnauthenticatedRefusalsChangeNothing(t *testing.T) {
	e := newEnv(t, zap.NewNop())
	ctx := context.Background()
	n := e.enroll(t)
	snapshot := func() string {
		var events corev1.EventList
		var markers v1alpha1.AttestationNonceList
		rec, _ := e.store.GetNode(ctx, n.Name)
		if err := e.kube.List(ctx, &events); err != nil {
			t.Fatal(err)
		}
		if err := e.kube.List(ctx, &markers); err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("%d events, %d markers, record %s", len(events.Items), len(markers.Items), rec.ResourceVersion)
	}
	before := snapshot()
	for range 20 {
		req := e.attestRequest(n.Name)
		req.Nonce = make([]byte, attest.NonceLen)
		if _, err := e.svc.Attest(ctx, req); !errors.Is(err, ErrNonce) {
			t.Fatalf("Attest with a made-up nonce = %v", err)
		}
		req = e.attestRequest(n.Name)
		req.Signature = slices.Clone(req.Signature)
		req.Signature[len(req.Signature)-1] ^= 1
		if _, err := e.svc.Attest(ctx, req); !errors.Is(err, ErrRefused) {
			t.Fatalf("Attest with a forged signature = %v", err)
		}
	}
	if after := snapshot(); after != before {
		t.Fatalf("unauthenticated refusals changed state: %s, then %s", before, after)
	}
	// The forged quotes did not use the nonce: the genuine one still attests.
	if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); err != nil {
		t.Fatalf("genuine attestation after the forgeries: %v", err)
	}
}

// failingStatus fails every status write.
type failingStatus struct{ *KubeStore }

func (failingStatus) UpdateNodeStatus(context.Context, *v1alpha1.SovraNode) error {
	return errors.New("the datastore is down")
}

// TestRecordFirstThenCredential: a verdict that cannot be recorded issues no
// credential.
func TestRecordFirstThenCredential(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	n := e.enroll(t)
	svc, err := New(e.svc.cfg, failingStatus{e.store}, e.clock, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	res, err := svc.Attest(context.Background(), e.attestRequest(n.Name))
	if err == nil || res != nil {
		t.Fatalf("Attest with a failing status write = %v, %v; want an error and no credential", res, err)
	}
}

// TestBrokenPoliciesFailClosed: a policy the daemon cannot evaluate (a
// selector that does not parse, a PCR value that is no digest; admission
// refuses both, but a policy may predate it) fails the node.
func TestBrokenPoliciesFailClosed(t *testing.T) {
	for name, spec := range map[string]v1alpha1.AttestationPolicySpec{
		"selector": {NodeSelector: &v1alpha1.NodeSelector{MatchExpressions: []v1alpha1.NodeSelectorRequirement{{Key: "x", Operator: "Resembles"}}}},
		"pcr":      {PCRs: []v1alpha1.PCRRule{{Index: 7, Values: []string{"not-hex"}}}},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, zaptest.NewLogger(t))
			ctx := context.Background()
			n := e.enroll(t)
			if err := e.kube.Create(ctx, &v1alpha1.AttestationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "broken"}, Spec: spec}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.svc.Attest(ctx, e.attestRequest(n.Name)); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "policy-valid") {
				t.Fatalf("Attest under a broken policy = %v, want a policy violation", err)
			}
		})
	}
}

// TestConcurrentEnrollmentsBindAUUIDOnce: TPMs that enroll with one UUID at
// the same moment: exactly one gets it.
func TestConcurrentEnrollmentsBindAUUIDOnce(t *testing.T) {
	e := newEnv(t, zaptest.NewLogger(t))
	ctx := context.Background()
	svc, err := New(Config{EK: attest.EKPolicy{TrustOnFirstUse: true}, NodeCA: e.svc.cfg.NodeCA, NodeCAKey: e.svc.cfg.NodeCAKey},
		e.store, e.clock, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	const tpms = 6
	ens := make([]*Enrollment, tpms)
	for i := range ens {
		ek, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		req := e.enrollRequest()
		req.EKCertificate = nil
		if req.EKPublic, err = x509.MarshalPKIXPublicKey(&ek.PublicKey); err != nil {
			t.Fatal(err)
		}
		if ens[i], _, err = svc.BeginEnrollment(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	won := 0
	for _, en := range ens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := svc.FinishEnrollment(ctx, en, en.secret); err == nil {
				mu.Lock()
				won++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	var list v1alpha1.SovraNodeList
	if err := e.kube.List(ctx, &list); err != nil {
		t.Fatal(err)
	}
	if won != 1 || len(list.Items) != 1 {
		t.Fatalf("%d enrollments of one UUID succeeded, %d records exist; want exactly one", won, len(list.Items))
	}
	var claim v1alpha1.UUIDClaim
	if err := e.kube.Get(ctx, client.ObjectKey{Name: e.enrollRequest().UUID}, &claim); err != nil || claim.Spec.Node != list.Items[0].Name || claim.Spec.NodeUID != list.Items[0].UID {
		t.Fatalf("claim %+v (%v) for record %s/%s", claim.Spec, err, list.Items[0].Name, list.Items[0].UID)
	}
}
