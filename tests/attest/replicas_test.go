package attest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/controller-runtime/pkg/client"

	agentattest "github.com/sovra-dev/sovra/agent/attest"
	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/attestation"
	pb "github.com/sovra-dev/sovra/internal/nodeapi"
	"github.com/sovra-dev/sovra/tests/pgtest"
	"github.com/sovra-dev/sovra/tests/swtpmlab"
)

const (
	// raceRounds is how many fresh UUIDs two TPMs race for.
	raceRounds = 10
	// replicaSealWindow is the replicas' --seal-window: short, so that a
	// record is past its first window within seconds.
	replicaSealWindow = 3 * time.Second
	// sealingWindowAnnotation opens an operator's sealing window (daemon/kms).
	sealingWindowAnnotation = "kms.sovra.dev/sealing-window"
)

// sharedKeys are the files every replica of one deployment holds (README,
// "High availability on PostgreSQL"); the node CA key is also what every
// replica derives the nonce key from.
var sharedKeys = []string{"ca.crt", "ca.key", "sa.key", "sa.pub", "encryption-config.yaml", "node-ca.crt", "node-ca.key"}

// replicas is two sovrad on one PostgreSQL and one master keyring, with a
// swtpm lab whose two TPMs both pass their EK policy (--ek-roots).
type replicas struct {
	lab  *swtpmLab
	a, b *daemon
}

func startReplicas(t *testing.T, extra ...string) *replicas {
	t.Helper()
	pg := pgtest.Start(t)
	lab := newSwtpmLab(t)
	args := append([]string{"--datastore", pg.DSN("sovra"), "--ek-roots", lab.Roots(), "--ek-intermediates", lab.Intermediates()}, extra...)
	keyFile := filepath.Join(t.TempDir(), "master.key")
	dirA := filepath.Join(t.TempDir(), "a")
	a := startDaemonWith(t, dirA, keyFile, args...)
	dirB := filepath.Join(t.TempDir(), "b")
	if err := os.Mkdir(dirB, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range sharedKeys {
		data, err := os.ReadFile(filepath.Join(dirA, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dirB, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	b := startDaemonWith(t, dirB, keyFile, args...)
	return &replicas{lab: lab, a: a, b: b}
}

// agent is the agent of TPM i of the lab, calling the node API through c.
func (r *replicas) agent(t *testing.T, i int, c pb.NodeServiceClient) *agentattest.Agent {
	tpm, log := r.lab.use(t, i)
	return &agentattest.Agent{TPM: tpm, Client: c, Claims: swtpmlab.NodeRoot(t), EventLogPath: log,
		Node:   agentattest.Node{UUID: newUUID(), Hostname: fmt.Sprintf("cp-%d", i)},
		Logger: zaptest.NewLogger(t)}
}

// TestReplicaNonces: a nonce one replica issued is accepted by the other
// (they derive the nonce key from the node CA key they share), and once
// used through one replica it is refused through both.
func TestReplicaNonces(t *testing.T) {
	r := startReplicas(t)
	ctx := context.Background()
	ag := r.agent(t, 0, r.a.api)
	if err := ag.Enroll(ctx); err != nil {
		t.Fatalf("enrolling through replica A: %v", err)
	}
	name := ag.NodeName()
	for _, c := range []struct {
		name         string
		issuer, user *daemon
	}{{"A's nonce used at B", r.a, r.b}, {"B's nonce used at A", r.b, r.a}} {
		t.Run(c.name, func(t *testing.T) {
			nr, err := c.issuer.api.GetNonce(ctx, &pb.NonceRequest{Node: name})
			if err != nil {
				t.Fatal(err)
			}
			nk, err := agentattest.NewNodeKey()
			if err != nil {
				t.Fatal(err)
			}
			req, err := ag.EvidenceFor(ag.Key(), name, nk, nr.GetNonce())
			if err != nil {
				t.Fatal(err)
			}
			resp, err := c.user.api.Attest(ctx, req)
			if err != nil {
				t.Fatalf("attesting with the other replica's nonce: %v", err)
			}
			if len(resp.GetCertificateChain()) == 0 {
				t.Fatal("no credential")
			}
			if rec := r.a.node(t, name); rec.Status.LastAttestationResult != v1alpha1.ResultPassed {
				t.Fatalf("the verdict is not in the record: %+v", rec.Status)
			}
			for _, d := range []*daemon{c.issuer, c.user} {
				off, start := d.LogSize(), time.Now()
				_, err := d.api.Attest(ctx, req)
				requireStatus(t, err, codes.FailedPrecondition, "already used")
				d.requireDenialLogged(t, d.logSince(off), start, name, v1alpha1.ReasonEvidenceRejected)
			}
			t.Log("the replay is refused through both replicas: already used")
			var marker v1alpha1.AttestationNonce
			if err := r.b.kube.Get(ctx, client.ObjectKey{Name: attestation.NonceName(req.Nonce)}, &marker); err != nil || marker.Spec.Node != name {
				t.Fatalf("used-nonce marker: %+v %v", marker.Spec, err)
			}
		})
	}
}

// TestReplicaUUIDRace: two different TPMs, both admitted, enroll with the
// same UUID at the same moment, one through each replica, for raceRounds
// fresh UUIDs. Each time exactly one enrollment binds the UUID; the other
// is refused because the UUID is bound (or asked to retry while the
// winner's record is being created, and refused when it does); exactly
// one record claims the UUID and the UUIDClaim names that record instance.
func TestReplicaUUIDRace(t *testing.T) {
	r := startReplicas(t)
	type racer struct {
		tpm     agentattest.TPM
		replica *daemon
	}
	tpm0, _ := r.lab.use(t, 0)
	tpm1, _ := r.lab.use(t, 1)
	racers := []racer{{tpm0, r.a}, {tpm1, r.b}}
	wins := map[string]int{}
	retries := 0
	for round := range raceRounds {
		uuid := newUUID()
		enrollments := make([]*enrollment, len(racers))
		for i, rc := range racers {
			enrollments[i] = beginEnrollment(t, rc.replica.api, rc.tpm, uuid)
		}
		// Both hold their activation proofs: send them at once.
		results := make([]enrollResult, len(racers))
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, e := range enrollments {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				results[i] = e.finish()
			}()
		}
		close(start)
		wg.Wait()

		winner, loser := -1, -1
		for i, res := range results {
			switch {
			case res.err == nil && winner < 0:
				winner = i
			case res.err == nil:
				t.Fatalf("round %d: both TPMs bound UUID %s: %s and %s", round, uuid, results[0].node, results[1].node)
			default:
				loser = i
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: no enrollment bound UUID %s: %v / %v", round, uuid, results[0].err, results[1].err)
		}
		won := results[winner].node
		wins[won]++
		err := results[loser].err
		if status.Code(err) == codes.Aborted && strings.Contains(err.Error(), "retry") {
			// The winner's record did not exist yet: the loser retries, as
			// the agent does, and is refused now that it does.
			retries++
			err = beginEnrollment(t, racers[loser].replica.api, racers[loser].tpm, uuid).finish().err
		}
		r.requireOneBinding(t, round, uuid, won)
		requireStatus(t, err, codes.PermissionDenied, "is bound to node "+won)
	}
	t.Logf("%d rounds: wins %v; %d losers were asked to retry first", raceRounds, wins, retries)
}

// requireOneBinding checks that node, and no other record, claims uuid,
// and that the UUID's claim names that instance of it. Each replica's view
// of a list follows the database within moments, so the check waits for
// both views to agree; a second claimant in either view fails at once (no
// stale view shows a record that never claimed the UUID).
func (r *replicas) requireOneBinding(t *testing.T, round int, uuid, node string) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(converge)
	for {
		done := true
		for _, d := range []*daemon{r.a, r.b} {
			var claimants []string
			for _, n := range d.nodes(t) {
				if n.Spec.UUID == uuid || n.Labels[v1alpha1.LabelUUID] == uuid {
					claimants = append(claimants, n.Name)
				}
			}
			if len(claimants) > 1 || (len(claimants) == 1 && claimants[0] != node) {
				t.Fatalf("round %d: records claiming UUID %s: %v, want only %s", round, uuid, claimants, node)
			}
			var c v1alpha1.UUIDClaim
			err := d.kube.Get(ctx, client.ObjectKey{Name: uuid}, &c)
			rec := d.node(t, node)
			switch {
			case err == nil && c.Spec.Node != node:
				t.Fatalf("round %d: the claim of UUID %s names %s, want %s", round, uuid, c.Spec.Node, node)
			case err != nil || len(claimants) == 0 || c.Spec.NodeUID != rec.UID:
				done = false
				if time.Now().After(deadline) {
					t.Fatalf("round %d: through %s, records claiming UUID %s: %v; its claim: %+v %v; want %s/%s",
						round, d.DataDir, uuid, claimants, c.Spec, err, node, rec.UID)
				}
			}
		}
		if done {
			return
		}
		time.Sleep(pollPause)
	}
}

// enrollment is an enrollment stopped before its last step: the TPM has
// recovered the challenge secret, which is not sent yet.
type enrollment struct {
	stream pb.NodeService_EnrollClient
	cancel context.CancelFunc
	secret []byte
}

type enrollResult struct {
	node string
	err  error
}

// beginEnrollment makes a fresh AK in tpm, sends it with the EK and uuid
// through c, and activates the challenge.
func beginEnrollment(t *testing.T, c pb.NodeServiceClient, tpm agentattest.TPM, uuid string) *enrollment {
	t.Helper()
	key, err := agentattest.NewKey(tpm)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	t.Cleanup(cancel)
	stream, err := c.Enroll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.EnrollRequest{Step: &pb.EnrollRequest_Begin{Begin: key.Begin(uuid, "racer", nil)}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("enrollment challenge: %v", err)
	}
	secret, err := key.Activate(tpm, resp.GetChallenge())
	if err != nil {
		t.Fatal(err)
	}
	return &enrollment{stream: stream, cancel: cancel, secret: secret}
}

// finish sends the proof and returns the outcome.
func (e *enrollment) finish() enrollResult {
	defer e.cancel()
	if err := e.stream.Send(&pb.EnrollRequest{Step: &pb.EnrollRequest_Proof{Proof: &pb.ActivationProof{Secret: e.secret}}}); err != nil {
		return enrollResult{err: err}
	}
	resp, err := e.stream.Recv()
	if err != nil {
		return enrollResult{err: err}
	}
	return enrollResult{node: resp.GetResult().GetNode()}
}

// TestReplicaSealingWindows: a record past its sealing window is refused a
// Seal on both replicas with exactly the answer an unknown UUID gets; a
// window an operator opens with kubectl on replica A's API lets a Seal
// through replica B, and the key opens through A.
func TestReplicaSealingWindows(t *testing.T) {
	r := startReplicas(t, "--seal-window", replicaSealWindow.String())
	ctx := context.Background()
	ag := r.agent(t, 0, r.a.api)
	if err := ag.Enroll(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := ag.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	name, uuid := ag.NodeName(), ag.Node.UUID
	rec := r.a.node(t, name)
	closed := rec.CreationTimestamp.Add(replicaSealWindow)
	if w := rec.Status.Sealing; w != nil && w.Window != nil && w.Window.Expires.After(closed) {
		closed = w.Window.Expires.Time
	}
	time.Sleep(time.Until(closed) + time.Second)

	key := random(32)
	_, unknown := r.a.seal(ctx, newUUID(), key)
	requireUniformDenial(t, unknown)
	for _, d := range []*daemon{r.a, r.b} {
		off := d.LogSize()
		_, err := d.seal(ctx, uuid, key)
		requireUniformDenial(t, err)
		if !proto.Equal(status.Convert(err).Proto(), status.Convert(unknown).Proto()) {
			t.Fatalf("a Seal past the window is answered %v, an unknown UUID %v", err, unknown)
		}
		logged := false
		for _, l := range d.logSince(off) {
			logged = logged || (l.Msg == "kms decision" && l.field("op") == "Seal" && l.field("node_uuid") == uuid && l.field("reason") == "NoSealingWindow")
		}
		if !logged {
			t.Fatalf("replica %s did not log the Seal refused for want of a window:\n%s", d.DataDir, d.Tail(10))
		}
	}
	if rec := r.a.node(t, name); len(rec.Status.KeySalt) > 0 || (rec.Status.Sealing != nil && rec.Status.Sealing.FirstSealed != nil) {
		t.Fatalf("a refused Seal left state on the record: %+v", rec.Status.Sealing)
	}
	t.Log("past its window, the node's Seal is refused on both replicas exactly as an unknown UUID's")

	r.a.kubectl(t, "annotate", "sovranode", name, sealingWindowAnnotation+"=30m")
	var blob []byte
	deadline := time.Now().Add(converge)
	for {
		var err error
		if blob, err = r.b.seal(ctx, uuid, key); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Seal through replica B after the operator opened a window on A: %v\nA:\n%s\nB:\n%s", err, r.a.Tail(10), r.b.Tail(10))
		}
		time.Sleep(pollPause)
	}
	for {
		got, err := r.a.unseal(ctx, uuid, blob)
		if err == nil {
			if !bytes.Equal(got, key) {
				t.Fatal("replica A opened the blob to another key")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Unseal through replica A of the blob B sealed: %v", err)
		}
		time.Sleep(pollPause)
	}
	rec = r.a.node(t, name)
	if w := rec.Status.Sealing; w == nil || w.Window == nil || w.Window.Reason != v1alpha1.WindowOperator || w.FirstSealed == nil {
		t.Fatalf("sealing status after the operator's window: %+v", rec.Status.Sealing)
	}
	t.Logf("the operator's window (%s) let the Seal through replica B; replica A opened the blob", rec.Status.Sealing.Window.By)
}

// requireUniformDenial checks the KMS's one answer to a refused call:
// PermissionDenied, "permission denied", no details.
func requireUniformDenial(t *testing.T, err error) {
	t.Helper()
	st, ok := status.FromError(err)
	if err == nil || !ok || st.Code() != codes.PermissionDenied || st.Message() != "permission denied" || len(st.Details()) != 0 {
		t.Fatalf("want the uniform denial (PermissionDenied, %q), got %v", "permission denied", err)
	}
}
