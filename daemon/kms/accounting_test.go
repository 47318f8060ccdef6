package kms

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	kmsapi "github.com/siderolabs/kms-client/api/kms"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8smetrics "k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/testutil"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

func TestJudge(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	const deadline = 10 * time.Minute
	rec := func(boots ...v1alpha1.Boot) *v1alpha1.SovraNode {
		n := &v1alpha1.SovraNode{Status: v1alpha1.SovraNodeStatus{Boots: boots}}
		return n
	}
	withAddr := func(n *v1alpha1.SovraNode) *v1alpha1.SovraNode {
		n.Spec.Addresses = []string{"10.0.0.1"}
		return n
	}
	boot := func(id string, started time.Time) v1alpha1.Boot {
		return v1alpha1.Boot{ID: id, Started: metav1.NewTime(started), Result: v1alpha1.ResultPassed}
	}
	entry := func(id, source string, at time.Time) v1alpha1.LedgerEntry {
		return v1alpha1.LedgerEntry{ID: id, Blob: "b1", Source: source, At: metav1.NewMicroTime(at), Last: metav1.NewMicroTime(at), Count: 1}
	}
	sealedRec := &v1alpha1.SovraNode{Status: v1alpha1.SovraNodeStatus{Sealing: &v1alpha1.Sealing{
		Recent: []v1alpha1.SealedBlob{{Blob: "b1", At: metav1.NewTime(t0)}}}}}
	for _, tc := range []struct {
		name   string
		rec    *v1alpha1.SovraNode
		e      v1alpha1.LedgerEntry
		others []v1alpha1.LedgerEntry
		now    time.Time
		want   string // verdict, then the boot or reason
	}{
		{"first release of a boot", rec(boot("B1", t0)), entry("e", "10.0.0.1", t0.Add(20*time.Second)), nil, t0.Add(time.Minute), "Explained B1"},
		{"the newest boot that started before it", rec(boot("B2", t0.Add(time.Hour)), boot("B1", t0)), entry("e", "10.0.0.1", t0.Add(time.Hour+time.Minute)), nil, t0.Add(2 * time.Hour), "Explained B2"},
		{"node clock a little behind", rec(boot("B1", t0.Add(time.Minute))), entry("e", "10.0.0.1", t0.Add(20*time.Second)), nil, t0.Add(time.Minute), "Explained B1"},
		{"a fresh seal's first open", sealedRec, entry("e", "10.0.0.1", t0.Add(5*time.Second)), nil, t0.Add(time.Minute), "Explained sealed at"},
		{"a retry from the same caller", rec(boot("B1", t0)), entry("e", "10.0.0.1", t0.Add(30*time.Second)),
			[]v1alpha1.LedgerEntry{entry("a", "10.0.0.1", t0.Add(20*time.Second))}, t0.Add(time.Minute), "Explained B1"},
		{"no boot reported yet: wait", rec(), entry("e", "10.0.0.1", t0), nil, t0.Add(time.Minute), ""},
		{"no boot reported by the deadline", rec(), entry("e", "10.0.0.1", t0), nil, t0.Add(deadline), "Unexpected " + reasonUnexpectedNoBoot},
		{"long after its boot's start: wait for a newer boot", rec(boot("B1", t0)), entry("e", "10.0.0.1", t0.Add(2*time.Hour)), nil, t0.Add(2*time.Hour + time.Minute), ""},
		{"long after its boot's start, past the deadline", rec(boot("B1", t0)), entry("e", "10.0.0.1", t0.Add(2*time.Hour)), nil, t0.Add(2*time.Hour + deadline), "Unexpected " + reasonUnexpectedTooLate},
		{"second source in one boot: wait", rec(boot("B1", t0)), entry("e", "192.0.2.9", t0.Add(5*time.Minute)),
			[]v1alpha1.LedgerEntry{entry("a", "10.0.0.1", t0.Add(20*time.Second))}, t0.Add(6 * time.Minute), ""},
		{"second source in one boot, past the deadline", rec(boot("B1", t0)), entry("e", "192.0.2.9", t0.Add(5*time.Minute)),
			[]v1alpha1.LedgerEntry{entry("a", "10.0.0.1", t0.Add(20*time.Second))}, t0.Add(5*time.Minute + deadline), "Unexpected " + reasonUnexpectedConflict},
		{"the same caller again, not a retry", rec(boot("B1", t0)), entry("e", "10.0.0.1", t0.Add(20*time.Minute)),
			[]v1alpha1.LedgerEntry{entry("a", "10.0.0.1", t0.Add(20*time.Second))}, t0.Add(20*time.Minute + deadline), "Unexpected " + reasonUnexpectedTwice},
		{"a boot that ended before it attested, from the node's address", withAddr(rec(boot("B2", t0.Add(5*time.Minute)))), entry("e", "10.0.0.1", t0), nil, t0.Add(time.Hour), "Explained a boot before B2"},
		{"the same, from an address that is not the node's", withAddr(rec(boot("B2", t0.Add(5*time.Minute)))), entry("e", "192.0.2.9", t0), nil, t0.Add(time.Hour), "Unexpected " + reasonUnexpectedNoBoot},
		{"the first release is the legitimate one", rec(boot("B1", t0)), entry("a", "10.0.0.1", t0.Add(20*time.Second)),
			[]v1alpha1.LedgerEntry{entry("e", "192.0.2.9", t0.Add(5*time.Minute))}, t0.Add(time.Hour), "Explained B1"},
	} {
		j := judge(tc.rec, tc.e, tc.others, tc.now, deadline)
		got := strings.TrimSpace(j.verdict + " " + j.boot + j.reason)
		if !strings.HasPrefix(got, tc.want) || (tc.want == "" && got != "") {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestUnexpectedUnseal: a second release of a node's blob to another
// source in one boot raises the condition and the event after the deadline,
// while the node's own release is explained; with QuarantineUnexpected the
// node is also quarantined.
func TestUnexpectedUnseal(t *testing.T) {
	for _, strict := range []bool{false, true} {
		s, st, clk := fixture(t, Config{AttestDeadline: time.Minute, QuarantineUnexpected: strict})
		unexpected, quarantines := counted(t, metrics.KMSUnexpectedReleases, reasonUnexpectedConflict), counted(t, metrics.KMSQuarantines, ReasonUnexpectedUnseal)
		released := counted(t, metrics.KMSDecisions, opUnseal, decisionAllowed, reasonReleased)
		st.put(attested("ek-a", uuidA, clk.Now(), "10.0.0.1"))
		ctx := context.Background()
		sealed, err := s.Seal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: make([]byte, 32)})
		if err != nil {
			t.Fatal(err)
		}
		// A later boot: the node unseals, then reports the boot.
		clk.Advance(time.Hour)
		if _, err := s.Unseal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
			t.Fatal(err)
		}
		booted(st, "ek-a", "B2", clk.Now().Add(-30*time.Second), v1alpha1.ResultPassed)
		s.AccountOnce(ctx, st)
		// Someone else opens the same blob in the same boot.
		clk.Advance(2 * time.Minute)
		if _, err := s.Unseal(from("192.0.2.9"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
			t.Fatal(err)
		}
		s.AccountOnce(ctx, st)
		if conditionTrue(st.Node("ek-a"), v1alpha1.ConditionUnexpectedUnseal) {
			t.Fatal("raised before the deadline: a boot reported later could still explain it")
		}
		clk.Advance(time.Minute)
		s.AccountOnce(ctx, st)
		rec := st.Node("ek-a")
		c := meta.FindStatusCondition(rec.Status.Conditions, v1alpha1.ConditionUnexpectedUnseal)
		if c == nil || c.Status != metav1.ConditionTrue || len(rec.Status.UnexpectedUnseals) != 1 || rec.Status.UnexpectedUnseals[0].Source != "192.0.2.9" {
			t.Fatalf("strict=%v: condition %+v, list %+v", strict, c, rec.Status.UnexpectedUnseals)
		}
		if len(st.eventsOf(ReasonUnexpectedUnseal)) != 1 {
			t.Fatalf("events: %v", st.events)
		}
		if quarantined(rec) != strict {
			t.Fatalf("strict=%v: quarantined %v", strict, quarantined(rec))
		}
		wantQuarantines := 0.0
		if strict {
			wantQuarantines = 1
		}
		if unexpected() != 1 || quarantines() != wantQuarantines || released() != 2 {
			t.Fatalf("strict=%v: counted %v unexpected releases, %v quarantines, %v releases", strict, unexpected(), quarantines(), released())
		}
		// Judged once: no second alarm.
		s.AccountOnce(ctx, st)
		if len(st.eventsOf(ReasonUnexpectedUnseal)) != 1 {
			t.Fatal("the same release raised twice")
		}
		// The ledger holds both releases with their verdicts.
		s.flush(ctx, st)
		verdicts := map[string]string{}
		for _, l := range st.Ledgers() {
			for _, e := range l.Spec.Entries {
				verdicts[e.Source] = e.Verdict + "/" + e.Boot
			}
		}
		if verdicts["10.0.0.1"] != "Explained/B2" || !strings.HasPrefix(verdicts["192.0.2.9"], "Unexpected/") {
			t.Fatalf("ledger verdicts %v", verdicts)
		}
	}
}

// TestFailedBootQuarantines: a boot that unsealed and then failed its
// attestation (the TPM's word), with no attestation of it ever passing,
// quarantines the node; a boot that passed and fails later (a policy added
// since) does not.
func TestFailedBootQuarantines(t *testing.T) {
	s, st, clk := fixture(t, Config{})
	st.put(attested("ek-a", uuidA, clk.Now(), "10.0.0.1"))
	ctx := context.Background()
	quarantines := counted(t, metrics.KMSQuarantines, ReasonFailedAfterUnseal)
	sealed, err := s.Seal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: make([]byte, 32)})
	if err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Hour)
	if _, err := s.Unseal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
		t.Fatal(err)
	}
	booted(st, "ek-a", "B2", clk.Now().Add(-time.Minute), v1alpha1.ResultPassed)
	s.AccountOnce(ctx, st)
	if quarantined(st.Node("ek-a")) {
		t.Fatal("quarantined after a passing attestation")
	}
	n := st.Node("ek-a")
	n.Status.Boots[0].Result = v1alpha1.ResultFailed
	st.put(n)
	s.AccountOnce(ctx, st)
	if quarantined(st.Node("ek-a")) {
		t.Fatal("quarantined when a boot that had passed failed later")
	}

	clk.Advance(time.Hour)
	if _, err := s.Unseal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
		t.Fatal(err)
	}
	booted(st, "ek-a", "B3", clk.Now().Add(-time.Minute), v1alpha1.ResultFailed)
	s.AccountOnce(ctx, st)
	s.AccountOnce(ctx, st)
	if c := meta.FindStatusCondition(st.Node("ek-a").Status.Conditions, ConditionQuarantined); c == nil || c.Reason != ReasonFailedAfterUnseal {
		t.Fatalf("quarantine: %+v", c)
	}
	if n := quarantines(); n != 1 {
		t.Fatalf("counted %v quarantines", n)
	}
}

// counted returns the growth of a counter's series since it was called.
func counted(t *testing.T, vec *k8smetrics.CounterVec, labels ...string) func() float64 {
	t.Helper()
	read := func() float64 {
		v, err := testutil.GetCounterMetricValue(vec.WithLabelValues(labels...))
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	start := read()
	return func() float64 { return read() - start }
}

// TestLedgerSurvivesRestart: releases are written in batches and a
// replica that restarts judges what it released before.
func TestLedgerSurvivesRestart(t *testing.T) {
	s, st, clk := fixture(t, Config{AttestDeadline: time.Minute, Replica: "r1"})
	st.put(attested("ek-a", uuidA, clk.Now(), "10.0.0.1"))
	ctx := context.Background()
	sealed, err := s.Seal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: make([]byte, 32)})
	if err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Hour)
	for range 5 { // one boot's call and its retries: one entry
		if _, err := s.Unseal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
			t.Fatal(err)
		}
	}
	s.flush(ctx, st)
	segs, _ := st.OwnLedgers(ctx, "r1")
	if len(segs) != 1 || len(segs[0].Spec.Entries) != 1 || segs[0].Spec.Entries[0].Count != 5 {
		t.Fatalf("segments %+v", segs)
	}
	restarted, err := NewWithStore(s.cfg, st, s.keyring, clk, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := restarted.ledger.load(ctx, st); err != nil {
		t.Fatal(err)
	}
	clk.Advance(2 * time.Minute)
	restarted.AccountOnce(ctx, st)
	if !conditionTrue(st.Node("ek-a"), v1alpha1.ConditionUnexpectedUnseal) {
		t.Fatal("the restarted replica did not judge the release it made before (no boot was ever reported)")
	}
	// An operator looks into it and clears it.
	yes := "yes"
	if err := st.Annotate(ctx, "ek-a", map[string]*string{AnnotationClearUnexpectedUnseal: &yes}); err != nil {
		t.Fatal(err)
	}
	restarted.SweepOnce(ctx, st)
	if rec := st.Node("ek-a"); conditionTrue(rec, v1alpha1.ConditionUnexpectedUnseal) || len(rec.Status.UnexpectedUnseals) != 0 {
		t.Fatal("not cleared")
	}
	// Past the retention the entry and its segment go.
	clk.Advance(BootUnsealWindow + s.cfg.AttestDeadline + retentionMargin + time.Minute)
	restarted.AccountOnce(ctx, st)
	restarted.flush(ctx, st)
	if segs, _ := st.OwnLedgers(ctx, "r1"); len(segs) != 0 {
		t.Fatalf("%d segments left past the retention", len(segs))
	}
}

// TestAdoptedReleasesCount: the key a machine's pending record released in
// its first boot counts as its enrolled record's once that record adopted
// the pending one: that boot failing its attestation quarantines the node,
// and passing it does not.
func TestAdoptedReleasesCount(t *testing.T) {
	for _, result := range []string{v1alpha1.ResultFailed, v1alpha1.ResultPassed} {
		s, st, clk := fixture(t, Config{})
		ctx := context.Background()
		started := clk.Now()
		if got, err := s.Expect(ctx, uuidA, netip.MustParseAddr("10.0.0.1"), 0, 0); err != nil || got != ExpectCreated {
			t.Fatalf("Expect: %v %v", got, err)
		}
		clk.Advance(time.Minute)
		sealed, err := s.Seal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: make([]byte, 32)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Unseal(from("10.0.0.1"), &kmsapi.Request{NodeUuid: uuidA, Data: sealed.Data}); err != nil {
			t.Fatal(err)
		}
		s.AccountOnce(ctx, st)

		// The machine enrolls (the claim is passed on) and the sweep adopts
		// the pending record.
		clk.Advance(time.Minute)
		n := attested("ek-a", uuidA, clk.Now(), "10.0.0.1")
		n.Status.LastAttestationResult, n.Status.LastAttestationTime = "", nil
		st.put(n)
		c := st.Claim(uuidA).DeepCopy()
		c.Spec = v1alpha1.UUIDClaimSpec{Node: "ek-a", NodeUID: st.Node("ek-a").UID}
		if err := st.UpdateClaim(ctx, c); err != nil {
			t.Fatal(err)
		}
		s.SweepOnce(ctx, st)
		if st.Node(pendingNamePrefix+uuidA) != nil || len(st.Node("ek-a").Status.KeySalt) == 0 {
			t.Fatal("the pending record was not adopted")
		}

		// Its first boot, which unsealed under the pending record, attests.
		booted(st, "ek-a", "B1", started, result)
		s.AccountOnce(ctx, st)
		s.AccountOnce(ctx, st)
		c2 := meta.FindStatusCondition(st.Node("ek-a").Status.Conditions, ConditionQuarantined)
		switch {
		case result == v1alpha1.ResultFailed && (c2 == nil || c2.Status != metav1.ConditionTrue || c2.Reason != ReasonFailedAfterUnseal):
			t.Fatalf("a first boot that unsealed and failed: quarantine %+v, want %s", c2, ReasonFailedAfterUnseal)
		case result == v1alpha1.ResultPassed && quarantined(st.Node("ek-a")):
			t.Fatalf("a first boot that passed is quarantined: %+v", c2)
		}
	}
}
