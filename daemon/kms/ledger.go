package kms

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/metrics"
)

// The ledger is this replica's record of the keys it released. Every
// allowed Unseal is an entry, kept in memory and written in batches to
// UnsealLedger segments (one object per replica and period), so that a boot
// storm costs a few API writes, not one per call. The judge (accounting.go)
// gives each entry a verdict; an entry stays until it can no longer bear on
// another's verdict, then it and, once empty, its segment go.
const (
	// segmentEntries and segmentSpan bound a segment: a new one starts when
	// the current holds this many entries or is this old. Every write of a
	// segment sends (and the API server decodes, validates, stores and
	// audits) all of its entries, and the segment being filled is written
	// each second: small segments keep a storm's entries written about
	// once.
	segmentEntries = 64
	segmentSpan    = time.Minute
)

type entryKey struct {
	uid          types.UID
	blob, source string
}

type entry struct {
	v1alpha1.LedgerEntry
	seg *segment
}

type segment struct {
	name   string
	rv     string // resourceVersion; empty until written
	opened time.Time
	n      int // entries in it
	dirty  bool
}

// ledger is this replica's entries and segments. It is safe for concurrent
// use.
type ledger struct {
	replica string

	mu       sync.Mutex // guards everything below
	entries  []*entry   // oldest first
	byID     map[string]*entry
	byKey    map[entryKey]*entry
	segments map[string]*segment
	current  *segment
	seq      uint64
}

func newLedger(replica string) *ledger {
	return &ledger{replica: replica, byID: map[string]*entry{}, byKey: map[entryKey]*entry{}, segments: map[string]*segment{}}
}

// add records a release of blob to source for rec at now and returns its
// entry's ID. The same caller's release of the same blob within RetryWindow
// of its last is folded into that entry (a retry).
func (l *ledger) add(rec *v1alpha1.SovraNode, blob, source string, now time.Time) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := entryKey{uid: rec.UID, blob: blob, source: source}
	if e := l.byKey[k]; e != nil && now.Sub(e.Last.Time) <= RetryWindow {
		e.Count++
		e.Last = metav1.NewMicroTime(now)
		e.seg.dirty = true
		return e.ID
	}
	if l.current == nil || l.current.n >= segmentEntries || now.Sub(l.current.opened) >= segmentSpan {
		l.seq++
		l.current = &segment{name: fmt.Sprintf("%s-%s-%d", l.replica, now.UTC().Format("20060102t150405"), l.seq), opened: now}
		l.segments[l.current.name] = l.current
	}
	l.seq++
	e := &entry{LedgerEntry: v1alpha1.LedgerEntry{
		ID: l.replica + "-" + strconv.FormatUint(l.seq, 10), Node: rec.Name, NodeUID: rec.UID,
		Blob: blob, Source: source, At: metav1.NewMicroTime(now), Last: metav1.NewMicroTime(now), Count: 1,
	}, seg: l.current}
	l.entries = append(l.entries, e)
	l.byID[e.ID] = e
	l.byKey[k] = e
	countEntries(e.Verdict, 1)
	l.current.n++
	l.current.dirty = true
	return e.ID
}

// snapshot returns copies of every entry.
func (l *ledger) snapshot() []v1alpha1.LedgerEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]v1alpha1.LedgerEntry, len(l.entries))
	for i, e := range l.entries {
		out[i] = e.LedgerEntry
	}
	return out
}

// setVerdict gives entry id a verdict.
func (l *ledger) setVerdict(id, verdict, boot string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.byID[id]; e != nil {
		countEntries(e.Verdict, -1)
		countEntries(verdict, 1)
		e.Verdict, e.Boot = verdict, boot
		e.seg.dirty = true
	}
}

// rebook moves entry id to the record name with uid: the record that
// adopted its record (accounting.go, rebookAdopted).
func (l *ledger) rebook(id, name string, uid types.UID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.byID[id]
	if e == nil {
		return
	}
	if old := (entryKey{uid: e.NodeUID, blob: e.Blob, source: e.Source}); l.byKey[old] == e {
		delete(l.byKey, old)
	}
	e.Node, e.NodeUID = name, uid
	if k := (entryKey{uid: uid, blob: e.Blob, source: e.Source}); l.byKey[k] == nil {
		l.byKey[k] = e
	}
	e.seg.dirty = true
}

// prune drops the entries that keep is false for.
func (l *ledger) prune(keep func(v1alpha1.LedgerEntry) bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	kept := l.entries[:0]
	for _, e := range l.entries {
		if keep(e.LedgerEntry) {
			kept = append(kept, e)
			continue
		}
		e.seg.n--
		e.seg.dirty = true
		countEntries(e.Verdict, -1)
		delete(l.byID, e.ID)
		k := entryKey{uid: e.NodeUID, blob: e.Blob, source: e.Source}
		if l.byKey[k] == e {
			delete(l.byKey, k)
		}
	}
	clear(l.entries[len(kept):])
	l.entries = kept
}

// load restores this replica's entries from its segments in the API.
func (l *ledger) load(ctx context.Context, st Store) error {
	segs, err := st.OwnLedgers(ctx, l.replica)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, obj := range segs {
		seg := &segment{name: obj.Name, rv: obj.ResourceVersion, opened: obj.CreationTimestamp.Time}
		l.segments[seg.name] = seg
		for _, le := range obj.Spec.Entries {
			e := &entry{LedgerEntry: le, seg: seg}
			countEntries(le.Verdict, 1)
			seg.n++
			l.entries = append(l.entries, e)
			l.byID[le.ID] = e
			l.byKey[entryKey{uid: le.NodeUID, blob: le.Blob, source: le.Source}] = e
			if i := strings.LastIndexByte(le.ID, '-'); i >= 0 {
				if n, err := strconv.ParseUint(le.ID[i+1:], 10, 64); err == nil && n > l.seq {
					l.seq = n
				}
			}
		}
		if seg.n == 0 {
			seg.dirty = true // delete it on the next flush
		}
	}
	return nil
}

// write is a segment to write: its object, or a deletion.
type write struct {
	seg *segment
	obj *v1alpha1.UnsealLedger
}

// dirty takes the segments that changed since the last flush.
func (l *ledger) dirty() []write {
	l.mu.Lock()
	defer l.mu.Unlock()
	byseg := map[*segment][]v1alpha1.LedgerEntry{}
	for _, e := range l.entries {
		if e.seg.dirty {
			byseg[e.seg] = append(byseg[e.seg], e.LedgerEntry)
		}
	}
	var out []write
	for _, seg := range l.segments {
		if !seg.dirty {
			continue
		}
		seg.dirty = false
		out = append(out, write{seg: seg, obj: &v1alpha1.UnsealLedger{
			ObjectMeta: metav1.ObjectMeta{Name: seg.name, ResourceVersion: seg.rv,
				Labels: map[string]string{v1alpha1.LabelReplica: l.replica}},
			Spec: v1alpha1.UnsealLedgerSpec{Replica: l.replica, Entries: byseg[seg]},
		}})
	}
	return out
}

// written notes the outcome of a segment's write.
func (l *ledger) written(w write, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case err != nil:
		w.seg.dirty = true
	case len(w.obj.Spec.Entries) == 0:
		delete(l.segments, w.seg.name)
		if l.current == w.seg {
			l.current = nil
		}
	default:
		w.seg.rv = w.obj.ResourceVersion
	}
}

// flush writes the changed segments of the ledger.
func (s *Service) flush(ctx context.Context, st Store) {
	for _, w := range s.ledger.dirty() {
		var err error
		switch {
		case len(w.obj.Spec.Entries) == 0 && w.seg.rv == "":
			s.ledger.written(w, nil) // never written: nothing to delete
			continue
		case len(w.obj.Spec.Entries) == 0:
			err = st.DeleteLedger(ctx, w.obj)
		default:
			err = st.SaveLedger(ctx, w.obj)
			if errors.Is(err, errConflict) {
				err = s.refreshVersion(ctx, st, w)
			}
		}
		if err != nil {
			s.logger.Warn("writing the ledger of key releases; will retry", zap.String("segment", w.obj.Name), zap.Error(err))
			metrics.KMSLedgerWrites.WithLabelValues(writeError).Inc()
		} else {
			metrics.KMSLedgerWrites.WithLabelValues(writeOK).Inc()
		}
		s.ledger.written(w, err)
	}
}

// refreshVersion takes the resourceVersion of a segment whose write
// conflicted (a write whose answer was lost) and writes it again.
func (s *Service) refreshVersion(ctx context.Context, st Store, w write) error {
	segs, err := st.OwnLedgers(ctx, s.ledger.replica)
	if err != nil {
		return err
	}
	w.obj.ResourceVersion = ""
	for _, o := range segs {
		if o.Name == w.obj.Name {
			w.obj.ResourceVersion = o.ResourceVersion
		}
	}
	return st.SaveLedger(ctx, w.obj)
}
