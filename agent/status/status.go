// Package status is the agent's status document: a small JSON file in the
// agent's state directory that says what the agent is doing (phase), what it
// last learned (attestation, election, volumes) and what last went wrong. The
// agent rewrites it atomically on every change, so an operator can read it at
// any time with `talosctl read /var/lib/sovra-agent/status.json` and
// pretty-print it with `sovra-agent status`.
package status

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"
)

const (
	// DefaultDir is the agent's state directory on a Talos node, mounted
	// into the ext-sovra-agent container at the same path.
	DefaultDir = "/var/lib/sovra-agent"
	// FileName is the status document's name in the state directory.
	FileName = "status.json"
	// SchemaVersion is the version of the document's format. A reader
	// refuses documents with a newer major format than it knows.
	SchemaVersion = 1

	// fileMode lets only root (talosctl read runs as root on the node) read
	// the document: it names peers and devices.
	fileMode = 0o600
)

// Phase is what the agent is doing now.
type Phase string

// Phases, in the order a control-plane node goes through them. Workers skip
// discovery, election and bootstrap.
const (
	PhaseStarting      Phase = "Starting"
	PhaseEnrolling     Phase = "Enrolling"
	PhaseAttesting     Phase = "Attesting"
	PhaseDiscovering   Phase = "Discovering"
	PhaseElecting      Phase = "Electing"
	PhaseBootstrapping Phase = "Bootstrapping"
	PhaseUnlocking     Phase = "Unlocking"
	// PhaseReady: attested, bootstrap settled, volumes unlocked; the agent
	// re-attests periodically.
	PhaseReady Phase = "Ready"
	// PhaseDegraded: the agent keeps retrying after an error (see LastError).
	PhaseDegraded Phase = "Degraded"
)

// AttestationState is the outcome of the node's last attestation.
type AttestationState string

// Attestation states.
const (
	AttestationPending AttestationState = "Pending"
	AttestationPassed  AttestationState = "Passed"
	AttestationFailed  AttestationState = "Failed"
	// AttestationUnavailable: this machine cannot attest (no TPM device,
	// no UEFI variables); Reason says what is missing.
	AttestationUnavailable AttestationState = "Unavailable"
)

// Role is the node's part in the bootstrap election.
type Role string

// Roles.
const (
	// RoleNone: a worker, or no election has run yet.
	RoleNone      Role = ""
	RoleCandidate Role = "Candidate"
	RoleLeader    Role = "Leader"
	RoleFollower  Role = "Follower"
)

// VolumeState is the state of an agent-managed encrypted volume.
type VolumeState string

// Volume states.
const (
	VolumeWaiting  VolumeState = "Waiting"
	VolumeUnlocked VolumeState = "Unlocked"
	VolumeFailed   VolumeState = "Failed"
)

// Document is the status document. Zero values mean "not known yet".
type Document struct {
	// SchemaVersion is the format version (SchemaVersion).
	SchemaVersion int `json:"schemaVersion"`
	// AgentVersion is the version of the agent that wrote the document.
	AgentVersion string `json:"agentVersion,omitempty"`
	// Node names the node (hostname or SMBIOS UUID).
	Node string `json:"node,omitempty"`
	// Phase is what the agent is doing now.
	Phase Phase `json:"phase"`
	// Message says in a sentence why the agent is in its phase.
	Message string `json:"message,omitempty"`

	Attestation Attestation `json:"attestation"`
	Election    Election    `json:"election"`
	Volumes     []Volume    `json:"volumes,omitempty"`
	// Host is host mode's state; nil when host mode is off.
	Host *Host `json:"host,omitempty"`

	// StartedAt is when this agent process started.
	StartedAt time.Time `json:"startedAt"`
	// UpdatedAt is when the document was last written.
	UpdatedAt time.Time `json:"updatedAt"`
	// LastError is the most recent error; nil when none happened since start.
	LastError *Error `json:"lastError,omitempty"`
}

// Attestation is what the agent knows of its enrollment and attestation.
type Attestation struct {
	// Enrolled is true once the daemon accepted the node's EK and AK.
	Enrolled bool `json:"enrolled"`
	// State is the outcome of the last attestation; empty before the first.
	State AttestationState `json:"state,omitempty"`
	// Daemon is the daemon endpoint the agent attests to.
	Daemon string `json:"daemon,omitempty"`
	// PCRs are the PCR indexes quoted.
	PCRs []int `json:"pcrs,omitempty"`
	// Reason explains a failed attestation (the daemon's message), or
	// what this machine lacks when attestation is unavailable.
	Reason string `json:"reason,omitempty"`
	// LastAttempt and LastSuccess are zero until they happen.
	LastAttempt time.Time `json:"lastAttempt,omitzero"`
	LastSuccess time.Time `json:"lastSuccess,omitzero"`
	// CertificateExpiry is when the node credential from the last passing
	// attestation expires; zero when the agent holds none.
	CertificateExpiry time.Time `json:"certificateExpiry,omitzero"`
}

// Election is what the agent knows of the etcd bootstrap election. Workers
// leave it zero.
type Election struct {
	// Role is this node's role; RoleNone on workers.
	Role Role `json:"role,omitempty"`
	// Leader is the address of the elected leader, empty before a decision.
	Leader string `json:"leader,omitempty"`
	// Candidates are the control-plane peers seen in the last round.
	Candidates []string `json:"candidates,omitempty"`
	// Expected is the expected number of control-plane nodes; Quorum is the
	// majority of it that must be seen before electing.
	Expected int `json:"expected,omitempty"`
	Quorum   int `json:"quorum,omitempty"`
	// StableRounds counts the consecutive rounds with the same candidates.
	StableRounds int `json:"stableRounds,omitempty"`
	// Bootstrapped is true once etcd is known to run on the leader.
	Bootstrapped bool `json:"bootstrapped"`
	// DecidedAt is when the leader was elected; zero before.
	DecidedAt time.Time `json:"decidedAt,omitzero"`
}

// Volume is one agent-managed encrypted volume.
type Volume struct {
	// Name is the volume's name in the agent's configuration.
	Name string `json:"name"`
	// Device is the block device (partition) it lives on.
	Device string      `json:"device,omitempty"`
	State  VolumeState `json:"state"`
	// Message explains a Waiting or Failed state.
	Message   string    `json:"message,omitempty"`
	UpdatedAt time.Time `json:"updatedAt,omitzero"`
}

// Host is what host mode last reported to the daemon and did. It never
// holds the machine configuration.
type Host struct {
	// Phase is host mode's phase (agent/resources/host): waiting-attestation,
	// waiting, running, applied, reset or failed.
	Phase string `json:"phase"`
	// Mode is the configuration the machine runs: enrollment or configured.
	Mode string `json:"mode"`
	// Generation is the generation of the configuration the machine runs;
	// zero on the enrollment configuration.
	Generation int64 `json:"generation,omitempty"`
	// AppliedGeneration is the generation applied in this boot, if any.
	AppliedGeneration int64 `json:"appliedGeneration,omitempty"`
	// LastAction is the daemon's last answer: wait, apply, reset or none.
	LastAction string `json:"lastAction,omitempty"`
	// Message explains the phase.
	Message string `json:"message,omitempty"`
	// LastSync is when the daemon last answered.
	LastSync time.Time `json:"lastSync,omitzero"`
	// Error is the last failure, empty after a success.
	Error string `json:"error,omitempty"`
	// Hardware summarises what was reported.
	Architecture string `json:"architecture,omitempty"`
	CPUs         uint32 `json:"cpus,omitempty"`
	MemoryBytes  uint64 `json:"memoryBytes,omitempty"`
	Disks        int    `json:"disks,omitempty"`
}

// Error is an error the agent met, with where and when.
type Error struct {
	Time    time.Time `json:"time"`
	Phase   Phase     `json:"phase,omitempty"`
	Message string    `json:"message"`
}

// Path returns the status document's path in dir.
func Path(dir string) string { return filepath.Join(dir, FileName) }

// Write replaces dir/status.json with doc atomically: it writes a temporary
// file in dir, syncs it and renames it over the old document, so a reader sees
// either the old or the new document, never a torn one.
func Write(dir string, doc Document) error {
	if doc.SchemaVersion == 0 {
		doc.SchemaVersion = SchemaVersion
	}

	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the status document: %w", err)
	}

	b = append(b, '\n')

	// Talos creates the directory; elsewhere the first write does.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating the state directory: %w", err)
	}

	f, err := os.CreateTemp(dir, "."+FileName+".*")
	if err != nil {
		return fmt.Errorf("writing the status document: %w", err)
	}

	tmp := f.Name()

	defer os.Remove(tmp) //nolint:errcheck // gone after a successful rename

	if err := writeSync(f, b); err != nil {
		return fmt.Errorf("writing the status document: %w", err)
	}

	if err := os.Rename(tmp, Path(dir)); err != nil {
		return fmt.Errorf("replacing the status document: %w", err)
	}

	// Persist the rename itself.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}

	return nil
}

func writeSync(f *os.File, b []byte) error {
	if err := f.Chmod(fileMode); err != nil {
		f.Close() //nolint:errcheck

		return err
	}

	if _, err := f.Write(b); err != nil {
		f.Close() //nolint:errcheck

		return err
	}

	if err := f.Sync(); err != nil {
		f.Close() //nolint:errcheck

		return err
	}

	return f.Close()
}

// ErrNewerSchema is returned for a document written by a newer agent whose
// format this reader does not know.
var ErrNewerSchema = errors.New("status document has a newer format")

// Decode parses a status document.
func Decode(b []byte) (Document, error) {
	var doc Document

	if err := json.Unmarshal(b, &doc); err != nil {
		return doc, fmt.Errorf("decoding the status document: %w", err)
	}

	if doc.SchemaVersion > SchemaVersion {
		return doc, fmt.Errorf("%w (version %d, this reader knows %d): use a newer sovra-agent", ErrNewerSchema, doc.SchemaVersion, SchemaVersion)
	}

	return doc, nil
}

// Read reads the status document at path.
func Read(path string) (Document, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Document{}, fmt.Errorf("reading the status document: %w", err)
	}

	return Decode(b)
}

// Recorder keeps the agent's status and writes it to Dir on every update.
// The agent's controllers share one Recorder; it is safe for concurrent use.
type Recorder struct {
	// Dir is the state directory the document is written to.
	Dir string
	// Now returns the current time; nil means time.Now.
	Now func() time.Time

	mu  sync.Mutex // guards doc
	doc Document
}

// NewRecorder returns a Recorder for dir with the document started at now:
// phase Starting, the agent's version and node name filled in. It does not
// write anything until the first Update.
func NewRecorder(dir, agentVersion, node string, now func() time.Time) *Recorder {
	r := &Recorder{Dir: dir, Now: now}

	r.doc = Document{
		SchemaVersion: SchemaVersion,
		AgentVersion:  agentVersion,
		Node:          node,
		Phase:         PhaseStarting,
		StartedAt:     r.now(),
	}

	return r
}

func (r *Recorder) now() time.Time {
	if r.Now == nil {
		return time.Now().UTC()
	}

	return r.Now().UTC()
}

// Update applies fn to the document, stamps UpdatedAt and writes it. fn runs
// under the Recorder's lock and must not call back into the Recorder.
func (r *Recorder) Update(fn func(*Document)) error {
	r.mu.Lock()
	defer r.mu.Unlock()

	fn(&r.doc)
	r.doc.UpdatedAt = r.now()

	return Write(r.Dir, r.doc)
}

// SetPhase moves the agent to phase, with a one-sentence reason.
func (r *Recorder) SetPhase(phase Phase, message string) error {
	return r.Update(func(d *Document) {
		d.Phase = phase
		d.Message = message
	})
}

// RecordError records err as the last error, met in the current phase.
func (r *Recorder) RecordError(err error) error {
	return r.Update(func(d *Document) {
		d.LastError = &Error{Time: r.now(), Phase: d.Phase, Message: err.Error()}
	})
}

// Snapshot returns a copy of the current document.
func (r *Recorder) Snapshot() Document {
	r.mu.Lock()
	defer r.mu.Unlock()

	d := r.doc
	d.Volumes = append([]Volume(nil), r.doc.Volumes...)
	d.Election.Candidates = append([]string(nil), r.doc.Election.Candidates...)
	d.Attestation.PCRs = append([]int(nil), r.doc.Attestation.PCRs...)

	if r.doc.Host != nil {
		h := *r.doc.Host
		d.Host = &h
	}

	if r.doc.LastError != nil {
		e := *r.doc.LastError
		d.LastError = &e
	}

	return d
}

func writeJSON(w io.Writer, doc Document) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")

	return enc.Encode(doc)
}
