package attest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goattest "github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/legacy/tpm2"
	"go.uber.org/zap/zaptest"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	"github.com/sovra-dev/sovra/daemon/kms"
	"github.com/sovra-dev/sovra/internal/attest"
	"github.com/sovra-dev/sovra/internal/claims"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
	"github.com/sovra-dev/sovra/internal/tcglog"
	"github.com/sovra-dev/sovra/internal/volumeapi"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

const (
	// attackerUUID is the SMBIOS UUID the enrollment attacks claim.
	attackerUUID = "0badc0de-0000-4000-8000-000000000000"
	// otherNode is the record of another machine of the fleet.
	otherNode = "ek-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	// attackerAddr is the source address of the attacks; floodAddr that
	// of the anonymous nonce flood. The node calls from nodeAddr.
	attackerAddr = "127.0.0.3"
	floodAddr    = "127.0.0.2"
	// storyNonceTTL is the daemon's --nonce-ttl: short, so that the
	// expired-nonce attack waits it out on the daemon's own clock.
	storyNonceTTL = 5 * time.Second
	// storyCluster is the node's sovra.dev/cluster label, which the
	// membership calls need.
	storyCluster = "story"
	// nodeCallPause paces the node's own calls during an attack;
	// kmsCallRate bounds all its KMS calls, below the KMS's per-source rate
	// (5 a second, a burst of 20).
	nodeCallPause = 250 * time.Millisecond
	kmsCallRate   = 4
	// floodCalls anonymous GetNonce calls come from floodWorkers
	// goroutines; the victim asks for a nonce every victimEvery of them.
	floodCalls   = 1000
	floodWorkers = 8
	victimEvery  = 100
)

// story is one run of enroll, attest and the attacks against a lab and the
// built sovrad.
type story struct {
	t   *testing.T
	lab lab
	d   *daemon
	a   *agentattest.Agent
	// attacker is the node API as reached from attackerAddr.
	attacker pb.NodeServiceClient
	// cluster is the ClusterService with the node's latest credential.
	cluster pb.ClusterServiceClient
	// other is an AK in TPM 1, made on demand.
	other *agentattest.Key
	// key is the volume key the node sealed, blob what the KMS returned.
	key, blob []byte
	// kmsPace paces the node's KMS calls.
	kmsPace *rate.Limiter
}

func runStory(t *testing.T, l lab) {
	began := time.Now()
	ctx := context.Background()
	d := startDaemon(t, append([]string{"--nonce-ttl", storyNonceTTL.String()}, l.ekFlags(t)...)...)
	t.Logf("sovrad ready %s after its start", d.ReadyAt.Sub(d.StartedAt).Round(time.Millisecond))
	tpm, log := l.use(t, 0)
	a := &agentattest.Agent{
		TPM: tpm, Client: d.api, Claims: swtpmlab.NodeRoot(t), EventLogPath: log,
		Node:   agentattest.Node{UUID: newUUID(), Hostname: "cp-1", Addresses: []string{"10.5.0.2"}},
		Logger: zaptest.NewLogger(t),
	}
	s := &story{t: t, lab: l, d: d, a: a, attacker: d.nodeClient(t, attackerAddr), kmsPace: rate.NewLimiter(kmsCallRate, 1)}

	if err := a.Enroll(ctx); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	cred, err := a.Attest(ctx)
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	n := d.node(t, a.NodeName())
	if c := meta.FindStatusCondition(n.Status.Conditions, v1alpha1.ConditionAttested); c == nil || c.Status != metav1.ConditionTrue {
		t.Fatalf("node not Attested after a passing attestation: %+v", n.Status)
	}
	wantMethod := "AllowList"
	if l.ekCertificates() {
		wantMethod = "Certificate"
	}
	if n.Status.EnrollmentMethod != wantMethod || n.Status.LastAttestationResult != v1alpha1.ResultPassed {
		t.Fatalf("status = %s/%s, want %s/Passed", n.Status.EnrollmentMethod, n.Status.LastAttestationResult, wantMethod)
	}
	if n.Status.Claims[claims.SecureBoot] != "enabled" || n.Status.Claims[claims.TalosVersion] != "v1.13.0" {
		t.Errorf("claims in status = %v", n.Status.Claims)
	}
	if _, err := cred.Leaf.Verify(x509.VerifyOptions{Roots: d.roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("node certificate does not verify with the daemon's node CA: %v", err)
	}
	if cred.Leaf.Subject.CommonName != a.NodeName() || time.Until(cred.Expires) > attestation.DefaultCertTTL+time.Minute {
		t.Fatalf("node certificate for %q until %v", cred.Leaf.Subject.CommonName, cred.Expires)
	}
	t.Logf("enrolled and attested %s (%s, %s)", n.Name, n.Status.EnrollmentMethod, n.Status.LastAttestationResult)

	// A second node of the fleet, whose nonces node A must not use and
	// whose record no attack may touch.
	other := &v1alpha1.SovraNode{ObjectMeta: metav1.ObjectMeta{Name: otherNode},
		Spec: v1alpha1.SovraNodeSpec{EKHash: strings.Repeat("b", 64), EKPublic: []byte{1}, AKPublic: []byte{1}}}
	if err := d.kube.Create(ctx, other); err != nil {
		t.Fatal(err)
	}

	if !t.Run("credential of an earlier record", s.earlierRecord) {
		return
	}
	s.cluster = d.clusterClient(t, a.ClientCertificate)
	s.sealVolume()
	s.attacks()
	t.Run("malformed attestation policies", s.policyAdmission)

	if _, err := a.Attest(ctx); err != nil {
		t.Fatalf("attest after the attacks: %v", err)
	}
	s.requireServed(t)
	out := d.Kubectl("get", "sovranodes", a.NodeName())
	t.Logf("kubectl get sovranodes:\n%s", out)
	if !strings.Contains(out, "True") || !strings.Contains(out, v1alpha1.ResultPassed) {
		t.Fatalf("kubectl does not show the node Attested")
	}
	t.Logf("story ran in %s", time.Since(began).Round(time.Millisecond))
}

// earlierRecord: the node's credential from before its record was deleted
// (kubectl delete sovranode, a revocation) and the same TPM enrolled again
// is worthless, though it still chains to the node CA and has not expired:
// the ClusterService and the volume key service refuse it, and serve the
// credential of the new record.
func (s *story) earlierRecord(t *testing.T) {
	ctx := context.Background()
	name := s.a.NodeName()
	s.d.kubectl(t, "label", "sovranode", name, "sovra.dev/cluster="+storyCluster)
	oldCred := s.a.Credential()
	old := s.d.clusterClient(t, fixed(oldCred))
	if _, err := old.ListMembers(ctx, &pb.ListMembersRequest{}); err != nil {
		t.Fatalf("ListMembers with the node's credential: %v", err)
	}
	oldUID := s.d.node(t, name).UID
	off := s.d.LogSize()

	// A node that never sealed has no shred finalizer: the record goes at once.
	s.d.kubectl(t, "delete", "sovranode", name, "--timeout=30s")
	_, err := old.ListMembers(ctx, &pb.ListMembersRequest{})
	requireStatus(t, err, codes.PermissionDenied, "its record was deleted")

	if err := s.a.Enroll(ctx); err != nil {
		t.Fatalf("enrolling the same TPM again: %v", err)
	}
	if _, err := s.a.Attest(ctx); err != nil {
		t.Fatalf("attesting after enrolling again: %v", err)
	}
	if s.d.node(t, name).UID == oldUID {
		t.Fatal("the record enrolled again has the UID of the deleted one")
	}
	s.d.kubectl(t, "label", "sovranode", name, "sovra.dev/cluster="+storyCluster)
	_, err = old.ListMembers(ctx, &pb.ListMembersRequest{})
	requireStatus(t, err, codes.PermissionDenied, "issued to an earlier instance of the record")
	t.Logf("refused: %s", status.Convert(err).Message())
	// The volume key service relies on the credential check alone (the
	// same boot attested again, so the old credential names the current
	// boot).
	oldKeys := volumeapi.NewVolumeKeyServiceClient(s.d.dial(t, nodeAddr, fixed(oldCred)))
	_, err = oldKeys.GetVolumeKey(ctx, &volumeapi.GetVolumeKeyRequest{VolumeId: "data"})
	requireStatus(t, err, codes.PermissionDenied, "issued to an earlier instance of the record")

	newCred := fixed(s.a.Credential())
	resp, err := s.d.clusterClient(t, newCred).ListMembers(ctx, &pb.ListMembersRequest{})
	if err != nil {
		t.Fatalf("ListMembers with the new credential: %v", err)
	}
	if !listsSelf(resp, name) {
		t.Fatalf("ListMembers does not list the caller: %v", resp)
	}
	vk, err := volumeapi.NewVolumeKeyServiceClient(s.d.dial(t, nodeAddr, newCred)).GetVolumeKey(ctx, &volumeapi.GetVolumeKeyRequest{VolumeId: "data"})
	if err != nil || len(vk.GetKey()) != 32 {
		t.Fatalf("GetVolumeKey with the new credential: %v", err)
	}
	found := false
	for _, l := range s.d.logSince(off) {
		found = found || (l.Msg == "denied: node credential refused" && l.field("node") == name)
	}
	if !found {
		t.Fatalf("the daemon logged no refusal of the old credential:\n%s", s.d.Tail(20))
	}
}

func listsSelf(resp *pb.ListMembersResponse, name string) bool {
	for _, m := range resp.GetMembers() {
		if m.GetSelf() && m.GetNode() == name {
			return true
		}
	}
	return false
}

// sealVolume seals the node's volume key as Talos does on its first
// install (inside the record's first sealing window), and checks it opens.
func (s *story) sealVolume() {
	t := s.t
	ctx := context.Background()
	s.key = random(32)
	deadline := time.Now().Add(converge)
	for {
		_ = s.kmsPace.Wait(ctx)
		blob, err := s.d.seal(ctx, s.a.Node.UUID, s.key)
		if err == nil {
			s.blob = blob
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sealing the node's volume key: %v\n%s", err, s.d.Tail(20))
		}
		time.Sleep(pollPause)
	}
	s.requireServed(t)
}

// requireServed checks that the node's own calls succeed: Unseal of its
// volume key (once the KMS's cache has seen its latest verdict) and
// ListMembers with its credential.
func (s *story) requireServed(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(converge)
	for {
		_ = s.kmsPace.Wait(ctx)
		got, err := s.d.unseal(ctx, s.a.Node.UUID, s.blob)
		if err == nil {
			if !bytes.Equal(got, s.key) {
				t.Fatal("Unseal returned another key")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node cannot unseal its volume key: %v\n%s", err, s.d.Tail(20))
		}
		time.Sleep(pollPause)
	}
	resp, err := s.cluster.ListMembers(ctx, &pb.ListMembersRequest{})
	if err != nil || !listsSelf(resp, s.a.NodeName()) {
		t.Fatalf("ListMembers with the node's credential: %v %v", resp, err)
	}
}

// requireCutOff checks that a node whose last attestation failed gets
// neither its key nor membership until it attests again.
func (s *story) requireCutOff(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	_, err := s.cluster.ListMembers(ctx, &pb.ListMembersRequest{})
	requireStatus(t, err, codes.PermissionDenied, "last attestation did not pass")
	deadline := time.Now().Add(converge)
	for {
		_ = s.kmsPace.Wait(ctx)
		data, err := s.d.unseal(ctx, s.a.Node.UUID, s.blob)
		if err != nil {
			requireStatus(t, err, codes.PermissionDenied, "permission denied")
			return
		}
		if data != nil && time.Now().After(deadline) {
			t.Fatal("the KMS still releases the key of a node whose attestation failed")
		}
		time.Sleep(pollPause)
	}
}

// nodeCalls are the node's own calls while an attack runs: rounds of an
// Unseal (as on a boot) and ListMembers (as the agent's discovery does),
// every one of which must succeed.
type nodeCalls struct {
	stopc, done chan struct{}
	// rounds and err are written by the calling goroutine until done.
	rounds int
	err    error
}

func (s *story) startNodeCalls() *nodeCalls {
	c := &nodeCalls{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for {
			if c.err = s.nodeRound(); c.err != nil {
				return
			}
			c.rounds++
			select {
			case <-c.stopc:
				return
			case <-time.After(nodeCallPause):
			}
		}
	}()
	return c
}

func (s *story) nodeRound() error {
	ctx := context.Background()
	_ = s.kmsPace.Wait(ctx)
	got, err := s.d.unseal(ctx, s.a.Node.UUID, s.blob)
	if err != nil {
		return fmt.Errorf("Unseal: %w", err)
	}
	if !bytes.Equal(got, s.key) {
		return errors.New("Unseal returned another key")
	}
	resp, err := s.cluster.ListMembers(ctx, &pb.ListMembersRequest{})
	if err != nil {
		return fmt.Errorf("ListMembers: %w", err)
	}
	if !listsSelf(resp, s.a.NodeName()) {
		return fmt.Errorf("ListMembers does not list the node: %v", resp)
	}
	return nil
}

// stop ends the calls and fails t if one failed.
func (c *nodeCalls) stop(t *testing.T) {
	t.Helper()
	close(c.stopc)
	<-c.done
	if c.err != nil {
		t.Fatalf("the node's own call failed during the attack: %v", c.err)
	}
	t.Logf("the node's own calls succeeded throughout: %d rounds of Unseal and ListMembers", c.rounds)
}

// attack is one attempt that must be refused.
type attack struct {
	name string
	// code and reason are what the refusal must carry.
	code   codes.Code
	reason string
	run    func(*story, *testing.T) error
	// denied names the node and reason of the refusal the daemon must log
	// (throttled per node and reason); nil when the call is refused before
	// the attestation service judges it (at the gRPC edge, or before it
	// names a node), which logs nothing.
	denied func(*story) (node, reason string)
	// authenticated attacks present evidence the node's own TPM signed:
	// they leave the node not attested, with this reason, instead of
	// leaving it unchanged.
	authenticated string
	// consumesNonce: the quote over the nonce verified with the node's
	// pinned AK, so the nonce is used up (a marker) although the
	// attestation is refused.
	consumesNonce bool
	// selfChecked attacks compare the records themselves (around the
	// attacking step only).
	selfChecked bool
}

// victim and stranger name the refusal logged about the node under test
// or about TPM 1.
func victim(reason string) func(*story) (string, string) {
	return func(s *story) (string, string) { return s.a.NodeName(), reason }
}

func stranger(reason string) func(*story) (string, string) {
	return func(s *story) (string, string) {
		ek, err := attest.ParseEK(nil, s.other.EKPublic)
		if err != nil {
			s.t.Fatal(err)
		}
		return attestation.NodeName(ek.Hash), reason
	}
}

func (s *story) attacks() {
	const (
		evidence = v1alpha1.ReasonEvidenceRejected
		enroll   = "EnrollmentDenied"
	)
	attacks := []attack{
		{name: "replayed nonce", code: codes.FailedPrecondition, reason: "already used", run: (*story).replayedNonce, denied: victim(evidence), selfChecked: true},
		{name: "expired nonce", code: codes.FailedPrecondition, reason: "expired", run: (*story).expiredNonce, denied: victim(evidence)},
		{name: "nonce of another node", code: codes.FailedPrecondition, reason: "not issued by this daemon, or issued to another node", run: (*story).otherNodesNonce, denied: victim(evidence)},
		{name: "anonymous nonce flood", code: codes.ResourceExhausted, reason: "too many node API calls from " + floodAddr, run: (*story).nonceFlood},
		{name: "quote signed by a software key", code: codes.PermissionDenied, reason: "signature does not verify with the pinned AK", run: (*story).softwareQuote, denied: victim(evidence)},
		{name: "enrollment of a software AK that was never activated", code: codes.PermissionDenied, reason: "credential activation failed", run: (*story).softwareAK, denied: victim(enroll)},
		{name: "AK from another TPM presented with this EK", code: codes.PermissionDenied, reason: "credential activation failed", run: (*story).otherTPMsAK, denied: victim(enroll)},
		{name: "EK not allowed", code: codes.PermissionDenied, reason: "not allowed by the enrollment policy", run: (*story).ekNotAllowed, denied: stranger(enroll)},
		{name: "EK certificate with a broken chain", code: codes.PermissionDenied, reason: "does not chain to a configured manufacturer root", run: (*story).ekBrokenChain, denied: stranger(enroll)},
		{name: "PCR value violating an Enforce policy", code: codes.PermissionDenied, reason: "policy violated", run: (*story).pcrPolicy, authenticated: v1alpha1.ReasonPolicyViolation},
		{name: "tampered event log", code: codes.PermissionDenied, reason: "event log does not replay", run: (*story).tamperedLog, authenticated: v1alpha1.ReasonEventLogMismatch},
		{name: "empty event log", code: codes.InvalidArgument, reason: "event log of 0 bytes", run: (*story).emptyLog, denied: victim(evidence)},
		{name: "claim altered after quoting", code: codes.PermissionDenied, reason: "extraData does not match", run: (*story).alteredClaim, denied: victim(evidence)},
		{name: "malformed claims", code: codes.InvalidArgument, reason: "malformed claims", run: (*story).malformedClaims, denied: victim(evidence)},
		{name: "malformed quote", code: codes.PermissionDenied, reason: "signature does not verify", run: (*story).malformedQuote, denied: victim(evidence)},
		{name: "malformed signature", code: codes.InvalidArgument, reason: "decoding signature", run: (*story).malformedSignature, denied: victim(evidence)},
		{name: "malformed EK", code: codes.InvalidArgument, reason: "malformed EK", run: (*story).malformedEK},
		{name: "oversized message", code: codes.ResourceExhausted, reason: "larger than max", run: (*story).oversizedMessage},
		{name: "oversized event log", code: codes.InvalidArgument, reason: "event log of", run: (*story).oversizedLog, denied: victim(evidence)},
		{name: "quote in the SHA-1 bank", code: codes.PermissionDenied, reason: "unaccepted hash algorithm", run: (*story).sha1Quote, denied: victim(evidence)},
		{name: "quote over too few PCRs", code: codes.PermissionDenied, reason: "wrong PCRs", run: (*story).fewPCRs, denied: victim(evidence)},
		{name: "PCR values not those quoted", code: codes.PermissionDenied, reason: "do not match the quoted digest", run: (*story).alteredPCR, denied: victim(evidence)},
		{name: "certificate request for another key", code: codes.PermissionDenied, reason: "not the node key whose hash was quoted", run: (*story).otherCSR, denied: victim(evidence), consumesNonce: true},
		{name: "attestation of a node never enrolled", code: codes.NotFound, reason: "enroll first", run: (*story).unenrolled},
	}
	for _, at := range attacks {
		s.t.Run(at.name, func(t *testing.T) {
			defer s.recover(t)
			before := s.snapshot(t)
			off, start := s.d.LogSize(), time.Now()
			var calls *nodeCalls
			if at.authenticated == "" {
				calls = s.startNodeCalls()
			}
			err := at.run(s, t)
			if calls != nil {
				calls.stop(t)
			}
			requireStatus(t, err, at.code, at.reason)
			t.Logf("refused: %s", status.Convert(err).Message())
			after := s.snapshot(t)
			s.checkLog(t, at, off, start)
			if at.selfChecked {
				return
			}
			markers, events := after.newMarkers(before), after.newEvents(before)
			if at.authenticated == "" {
				if after.nodes != before.nodes {
					t.Fatalf("records changed:\nbefore %s\nafter  %s", before.nodes, after.nodes)
				}
				if want := map[bool]int{false: 0, true: 1}[at.consumesNonce]; len(markers) != want {
					t.Fatalf("%d used-nonce markers appeared, want %d: %v", len(markers), want, markers)
				}
				if len(events) > 0 {
					t.Fatalf("an unauthenticated refusal was recorded in the API: %v", events)
				}
				return
			}
			n := s.d.node(t, s.a.NodeName())
			c := meta.FindStatusCondition(n.Status.Conditions, v1alpha1.ConditionAttested)
			if c == nil || c.Status != metav1.ConditionFalse || c.Reason != at.authenticated || n.Status.LastAttestationResult != v1alpha1.ResultFailed {
				t.Fatalf("node status after a failed authenticated attestation: %+v", n.Status)
			}
			if len(markers) == 0 {
				t.Fatal("the authenticated evidence did not use up its nonce")
			}
			if !hasEvent(events, s.a.NodeName(), corev1.EventTypeWarning, at.authenticated) {
				t.Fatalf("no %s warning event about the node since the attack started: %v", at.authenticated, events)
			}
			s.requireCutOff(t)
			// The boot had passed before: it is cut off, not quarantined
			// (the KMS judges its releases every JudgeInterval).
			time.Sleep(3 * kms.JudgeInterval)
			if n := s.d.node(t, s.a.NodeName()); n.Quarantined() {
				t.Fatalf("a boot that had passed was quarantined by a later failure: %+v", n.Status.Conditions)
			}
		})
	}
}

// recover brings the node back after an attack: TPM 0 current again (the
// node enrolls again when that rebooted it), then an ordinary attestation,
// after which the node's own calls succeed.
func (s *story) recover(t *testing.T) {
	ctx := context.Background()
	if s.lab.restore(t) {
		if err := s.a.Enroll(ctx); err != nil {
			t.Fatalf("re-enrolling after the TPM rebooted: %v", err)
		}
	}
	if _, err := s.a.Attest(ctx); err != nil {
		t.Fatalf("the node's attestation after the attack: %v", err)
	}
	s.requireServed(t)
}

// checkLog checks what the daemon logged from offset off, where the attack
// that started at start began: the refusal (one line per node and reason
// every denialLogEvery: an earlier line may stand for it), the verdict of
// an authenticated attack, and nothing recorded about the node otherwise.
func (s *story) checkLog(t *testing.T, at attack, off int64, start time.Time) {
	t.Helper()
	lines := s.d.logSince(off)
	if at.denied != nil {
		node, reason := at.denied(s)
		s.d.requireDenialLogged(t, lines, start, node, reason)
	}
	name := s.a.NodeName()
	for _, l := range lines {
		if l.field("node") != name {
			continue
		}
		switch {
		case at.authenticated != "" && l.Msg == "attestation failed" && l.field("reason") == at.authenticated:
			return
		case at.authenticated == "" && !at.selfChecked && (l.Msg == "attested" || l.Msg == "attestation failed" || l.Msg == "enrolled"):
			t.Fatalf("the daemon recorded %q about the node during an unauthenticated attack", l.Msg)
		}
	}
	if at.authenticated != "" {
		t.Fatalf("the daemon logged no failed attestation (%s) of the node:\n%s", at.authenticated, s.d.LogSince(off))
	}
}

// snapshot is what an attack must not change: every node record, the
// used-nonce markers, and the attestation service's events.
type snapshot struct {
	nodes   string
	markers map[string]bool
	events  map[string]corev1.Event
}

func (s *story) snapshot(t *testing.T) snapshot {
	t.Helper()
	b, err := json.Marshal(s.d.nodes(t))
	if err != nil {
		t.Fatal(err)
	}
	return snapshot{nodes: string(b), markers: s.d.markers(t), events: s.d.attestationEvents(t)}
}

// newMarkers are the markers after has that before had not (markers of
// expired nonces are swept meanwhile).
func (after snapshot) newMarkers(before snapshot) []string {
	var out []string
	for m := range after.markers {
		if !before.markers[m] {
			out = append(out, m)
		}
	}
	return out
}

func (after snapshot) newEvents(before snapshot) []corev1.Event {
	var out []corev1.Event
	for name, e := range after.events {
		if _, ok := before.events[name]; !ok {
			out = append(out, e)
		}
	}
	return out
}

func hasEvent(events []corev1.Event, node, typ, reason string) bool {
	for _, e := range events {
		if e.InvolvedObject.Name == node && e.Type == typ && e.Reason == reason {
			return true
		}
	}
	return false
}

// evidence builds the node's evidence (its TPM quotes) over a nonce the
// attacker asked for.
func (s *story) evidence(t *testing.T) *pb.AttestRequest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	nr, err := s.attacker.GetNonce(ctx, &pb.NonceRequest{Node: s.a.NodeName()})
	if err != nil {
		t.Fatal(err)
	}
	nk, err := agentattest.NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	req, err := s.a.EvidenceFor(s.a.Key(), s.a.NodeName(), nk, nr.GetNonce())
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// send sends an attestation as the attacker.
func (s *story) send(req *pb.AttestRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := s.attacker.Attest(ctx, req)
	return err
}

// replayedNonce: the attacker captured the node's attestation and sends it
// again.
func (s *story) replayedNonce(t *testing.T) error {
	ctx := context.Background()
	nk, err := agentattest.NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	req, err := s.a.Evidence(ctx, s.a.Key(), s.a.NodeName(), nk)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.d.api.Attest(ctx, req); err != nil {
		t.Fatalf("the node's own use of the nonce: %v", err)
	}
	// The first use changed the record legitimately and used the nonce
	// up; the replay must change nothing.
	before := s.snapshot(t)
	if !before.markers[attestation.NonceName(req.Nonce)] {
		t.Fatal("the node's attestation left no used-nonce marker")
	}
	err = s.send(req)
	after := s.snapshot(t)
	if after.nodes != before.nodes {
		t.Fatal("the replay changed the record")
	}
	if m, e := after.newMarkers(before), after.newEvents(before); len(m) > 0 || len(e) > 0 {
		t.Fatalf("the replay was recorded: markers %v, events %v", m, e)
	}
	return err
}

// expiredNonce waits out the daemon's nonce TTL before sending.
func (s *story) expiredNonce(t *testing.T) error {
	req := s.evidence(t)
	time.Sleep(storyNonceTTL + time.Second)
	return s.send(req)
}

func (s *story) otherNodesNonce(t *testing.T) error {
	ctx := context.Background()
	nr, err := s.attacker.GetNonce(ctx, &pb.NonceRequest{Node: otherNode})
	if err != nil {
		t.Fatal(err)
	}
	nk, _ := agentattest.NewNodeKey()
	req, err := s.a.EvidenceFor(s.a.Key(), s.a.NodeName(), nk, nr.GetNonce())
	if err != nil {
		t.Fatal(err)
	}
	return s.send(req)
}

// nonceFlood asks for floodCalls nonces for the victim's name from another
// address: issuing a nonce stores nothing, the per-address limit cuts the
// flood off, and the victim's own nonce calls from its address, one every
// victimEvery flood calls, all pass meanwhile. It returns the flood's last
// refusal.
func (s *story) nonceFlood(t *testing.T) error {
	off := s.d.LogSize()
	flood := s.d.nodeClient(t, floodAddr)
	getNonce := func(c pb.NodeServiceClient) error {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		_, err := c.GetNonce(ctx, &pb.NonceRequest{Node: s.a.NodeName()})
		return err
	}
	victimTurn, victimDone := make(chan struct{}, floodCalls/victimEvery), make(chan error, 1)
	go func() {
		for range victimTurn {
			if err := getNonce(s.d.api); err != nil {
				victimDone <- err
				for range victimTurn {
				}
				return
			}
		}
		victimDone <- nil
	}()
	var (
		calls           atomic.Int64
		issued, refused atomic.Int64
		mu              sync.Mutex // guards last, other
		last, other     error
		wg              sync.WaitGroup
	)
	for range floodWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for calls.Add(1) <= floodCalls {
				err := getNonce(flood)
				switch {
				case err == nil:
					issued.Add(1)
				case status.Code(err) == codes.ResourceExhausted:
					refused.Add(1)
					mu.Lock()
					last = err
					mu.Unlock()
				default:
					mu.Lock()
					other = err
					mu.Unlock()
				}
				if n := issued.Load() + refused.Load(); n%victimEvery == 0 {
					victimTurn <- struct{}{}
				}
			}
		}()
	}
	wg.Wait()
	close(victimTurn)
	if err := <-victimDone; err != nil {
		t.Fatalf("the victim's own GetNonce from %s failed during the flood: %v", nodeAddr, err)
	}
	if other != nil {
		t.Fatalf("a flood call failed otherwise than by the rate limit: %v", other)
	}
	// The flood's address stays cut off; the victim's does not.
	if err := getNonce(flood); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a flood call right after the flood: %v, want ResourceExhausted", err)
	}
	if err := getNonce(s.d.api); err != nil {
		t.Fatalf("the victim's GetNonce right after the flood: %v", err)
	}
	t.Logf("flood from %s: %d nonces issued, %d calls refused by --node-rate-per-ip; the victim's GetNonce calls from %s (one every %d flood calls) all passed",
		floodAddr, issued.Load(), refused.Load(), nodeAddr, victimEvery)
	logged := false
	for _, l := range s.d.logSince(off) {
		logged = logged || (strings.Contains(l.Msg, "over the per-address rate") && l.field("peer") == floodAddr)
	}
	if !logged {
		t.Fatalf("the daemon did not log the refused flood from %s", floodAddr)
	}
	return last
}

func (s *story) softwareQuote(t *testing.T) error {
	req := s.evidence(t)
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	digest := sha256.Sum256(req.Quote)
	sig, _ := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:])
	enc, err := tpm2.Signature{Alg: tpm2.AlgRSASSA, RSA: &tpm2.SignatureRSA{HashAlg: tpm2.AlgSHA256, Signature: sig}}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	req.Signature = enc
	return s.send(req)
}

// softwareAK forges the creation parameters of a restricted signing key
// with a software RSA key (they pass go-attestation's checks) and presents
// them with this node's EK. Without the EK's private key the attacker cannot
// recover the challenge secret.
func (s *story) softwareAK(t *testing.T) error {
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	pub := tpm2.Public{
		Type: tpm2.AlgRSA, NameAlg: tpm2.AlgSHA256,
		Attributes: tpm2.FlagSignerDefault | tpm2.FlagNoDA,
		RSAParameters: &tpm2.RSAParams{
			Sign: &tpm2.SigScheme{Alg: tpm2.AlgRSASSA, Hash: tpm2.AlgSHA256}, KeyBits: 2048,
			ModulusRaw: key.N.Bytes(),
		},
	}
	pubEnc, err := pub.Encode()
	if err != nil {
		t.Fatal(err)
	}
	name, _ := pub.Name()
	createData := s.a.Key().Params.CreateData // any valid TPMS_CREATION_DATA: only its hash is attested
	cdHash := sha256.Sum256(createData)
	att, err := tpm2.AttestationData{
		Magic: 0xff544347, Type: tpm2.TagAttestCreation, QualifiedSigner: name,
		AttestedCreationInfo: &tpm2.CreationInfo{Name: name, OpaqueDigest: cdHash[:]},
	}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(att)
	sig, _ := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, d[:])
	sigEnc, _ := tpm2.Signature{Alg: tpm2.AlgRSASSA, RSA: &tpm2.SignatureRSA{HashAlg: tpm2.AlgSHA256, Signature: sig}}.Encode()
	begin := s.a.Key().Begin(attackerUUID, "attacker", nil)
	begin.Ak = &pb.AttestationKey{Public: pubEnc, CreateData: createData, CreateAttestation: att, CreateSignature: sigEnc}
	return s.enroll(begin, func(*pb.ActivationChallenge) []byte { return random(32) })
}

// otherTPMsAK presents this node's EK with an AK made in another TPM: the
// other TPM cannot activate a credential made for this EK.
func (s *story) otherTPMsAK(t *testing.T) error {
	tpm := s.otherTPM(t)
	begin := s.other.Begin(attackerUUID, "attacker", nil)
	begin.EkCertificate, begin.EkPublic = s.a.Key().EKCertificate, s.a.Key().EKPublic
	if begin.EkCertificate != nil {
		begin.EkPublic = nil
	}
	return s.enroll(begin, func(c *pb.ActivationChallenge) []byte {
		secret, err := s.other.Activate(tpm, c)
		if err != nil {
			t.Logf("the other TPM cannot activate: %v", err)
			return random(32)
		}
		return secret
	})
}

func (s *story) ekNotAllowed(t *testing.T) error {
	tpm := s.otherTPM(t)
	begin := s.other.Begin(attackerUUID, "stranger", nil)
	begin.EkCertificate, begin.EkPublic = nil, s.other.EKPublic
	return s.enroll(begin, func(c *pb.ActivationChallenge) []byte {
		secret, _ := s.other.Activate(tpm, c)
		return secret
	})
}

// ekBrokenChain presents a certificate for the other TPM's EK issued by a CA
// that is not a configured root.
func (s *story) ekBrokenChain(t *testing.T) error {
	tpm := s.otherTPM(t)
	ca, caKey := newCA(t, "not a TPM manufacturer")
	pub, err := x509.ParsePKIXPublicKey(s.other.EKPublic)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "forged EK"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageKeyEncipherment,
	}, ca, pub, caKey)
	if err != nil {
		t.Fatal(err)
	}
	begin := s.other.Begin(attackerUUID, "stranger", nil)
	begin.EkCertificate, begin.EkPublic = der, nil
	return s.enroll(begin, func(c *pb.ActivationChallenge) []byte {
		secret, _ := s.other.Activate(tpm, c)
		return secret
	})
}

func (s *story) pcrPolicy(t *testing.T) error {
	ctx := context.Background()
	warn := &v1alpha1.AttestationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "warn-lockdown"},
		Spec: v1alpha1.AttestationPolicySpec{Claims: []v1alpha1.ClaimRule{{Name: claims.Lockdown, Values: []string{"confidentiality"}, Mode: v1alpha1.ModeWarn}}}}
	if err := s.d.kube.Create(ctx, warn); err != nil {
		t.Fatal(err)
	}
	defer s.d.kube.Delete(ctx, warn)
	cred, err := s.a.Attest(ctx)
	if err != nil || len(cred.Warnings) != 1 {
		t.Fatalf("a Warn policy must pass with one warning: %v %v", err, cred)
	}
	enforce := &v1alpha1.AttestationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "golden-pcr7"},
		Spec: v1alpha1.AttestationPolicySpec{
			NodeSelector: &v1alpha1.NodeSelector{},
			PCRs:         []v1alpha1.PCRRule{{Index: 7, Values: []string{strings.Repeat("ab", 32)}, Mode: v1alpha1.ModeEnforce}},
		}}
	if err := s.d.kube.Create(ctx, enforce); err != nil {
		t.Fatal(err)
	}
	defer s.d.kube.Delete(ctx, enforce)
	ak := s.d.node(t, s.a.NodeName()).Spec.AKPublic
	_, err = s.a.Attest(ctx)
	if !bytes.Equal(s.d.node(t, s.a.NodeName()).Spec.AKPublic, ak) {
		t.Fatal("a policy failure changed the pinned AK")
	}
	return err
}

func (s *story) tamperedLog(t *testing.T) error {
	req := s.evidence(t)
	log := tcglog.Firmware()
	log.Events[1].Digest[0] ^= 0xff // the Secure Boot variable measured into PCR 7
	req.EventLog = log.Bytes()
	return s.send(req)
}

func (s *story) emptyLog(t *testing.T) error {
	req := s.evidence(t)
	req.EventLog = nil
	return s.send(req)
}

func (s *story) alteredClaim(t *testing.T) error {
	req := s.evidence(t)
	cs, err := claims.Decode(req.Claims)
	if err != nil {
		t.Fatal(err)
	}
	cs.Set(claims.Lockdown, "confidentiality")
	req.Claims, _ = cs.Encode()
	return s.send(req)
}

func (s *story) malformedClaims(t *testing.T) error {
	req := s.evidence(t)
	req.Claims = []byte{0xff, 0x00}
	return s.send(req)
}

func (s *story) malformedQuote(t *testing.T) error {
	req := s.evidence(t)
	req.Quote = random(64)
	return s.send(req)
}

func (s *story) malformedSignature(t *testing.T) error {
	req := s.evidence(t)
	req.Signature = []byte{0x00, 0x14, 0x00}
	return s.send(req)
}

func (s *story) malformedEK(*testing.T) error {
	begin := s.a.Key().Begin(attackerUUID, "attacker", nil)
	begin.EkCertificate, begin.EkPublic = random(300), nil
	return s.enroll(begin, func(*pb.ActivationChallenge) []byte { return random(32) })
}

func (s *story) oversizedMessage(t *testing.T) error {
	req := s.evidence(t)
	req.EventLog = make([]byte, 3<<20)
	return s.send(req)
}

func (s *story) oversizedLog(t *testing.T) error {
	req := s.evidence(t)
	req.EventLog = append(req.EventLog, make([]byte, 1<<20)...)
	return s.send(req)
}

func (s *story) requote(t *testing.T, alg goattest.HashAlg, pcrs []int) *pb.AttestRequest {
	req := s.evidence(t)
	q, err := s.a.Key().Quote(s.a.TPM, claims.ExtraData(req.Nonce, req.Claims), alg, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	return agentattest.Request(req.Node, req.Nonce, req.Claims, q, req.EventLog, req.Csr)
}

func (s *story) sha1Quote(t *testing.T) error {
	return s.send(s.requote(t, goattest.HashSHA1, agentattest.QuotedPCRs))
}

func (s *story) fewPCRs(t *testing.T) error {
	return s.send(s.requote(t, goattest.HashSHA256, []int{7}))
}

func (s *story) alteredPCR(t *testing.T) error {
	req := s.evidence(t)
	req.Pcrs[0].Digest = bytes.Repeat([]byte{0}, 32)
	return s.send(req)
}

func (s *story) otherCSR(t *testing.T) error {
	req := s.evidence(t)
	nk, _ := agentattest.NewNodeKey()
	req.Csr, _ = nk.CSR(s.a.NodeName())
	return s.send(req)
}

func (s *story) unenrolled(t *testing.T) error {
	req := s.evidence(t)
	req.Node = "ek-" + strings.Repeat("0", 32)
	return s.send(req)
}

// otherTPM returns TPM 1 with an AK made in it, switching TPMs in labs that
// run one at a time; the agent's TPM switches back on its next use.
func (s *story) otherTPM(t *testing.T) agentattest.TPM {
	tpm, _ := s.lab.use(t, 1)
	if s.other == nil {
		k, err := agentattest.NewKey(tpm)
		if err != nil {
			t.Fatal(err)
		}
		s.other = k
	}
	return tpm
}

// enroll runs an enrollment round trip as the attacker with a chosen answer.
func (s *story) enroll(begin *pb.EnrollBegin, answer func(*pb.ActivationChallenge) []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	stream, err := s.attacker.Enroll(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&pb.EnrollRequest{Step: &pb.EnrollRequest_Begin{Begin: begin}}); err != nil {
		return err
	}
	resp, err := stream.Recv()
	if err != nil {
		return err
	}
	secret := answer(resp.GetChallenge())
	if err := stream.Send(&pb.EnrollRequest{Step: &pb.EnrollRequest_Proof{Proof: &pb.ActivationProof{Secret: secret}}}); err != nil {
		return err
	}
	_, err = stream.Recv()
	return err
}

// newUUID returns a random SMBIOS-style UUID.
func newUUID() string {
	b := random(16)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func random(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}
