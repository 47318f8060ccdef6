package status

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Print writes doc for a person: one aligned "key: value" line per fact, in
// sections, with times as RFC 3339 and their age relative to now.
func Print(w io.Writer, doc Document, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	p := func(key, value string) { fmt.Fprintf(tw, "%s:\t%s\n", key, value) }
	section := func(name string) { fmt.Fprintf(tw, "%s\n", name) }

	p("Node", orDash(doc.Node))
	p("Agent", orDash(doc.AgentVersion))
	p("Phase", phaseLine(doc))
	p("Started", ago(doc.StartedAt, now))
	p("Updated", ago(doc.UpdatedAt, now))

	a := doc.Attestation

	section("Attestation")
	p("  Enrolled", yesNo(a.Enrolled))
	p("  State", orDash(string(a.State)))

	if a.Reason != "" {
		p("  Reason", a.Reason)
	}

	if a.Daemon != "" {
		p("  Daemon", a.Daemon)
	}

	if len(a.PCRs) > 0 {
		p("  PCRs", joinInts(a.PCRs))
	}

	p("  Last attempt", ago(a.LastAttempt, now))
	p("  Last success", ago(a.LastSuccess, now))

	if !a.CertificateExpiry.IsZero() {
		p("  Credential expires", until(a.CertificateExpiry, now))
	}

	e := doc.Election

	section("Election")

	if e.Role == RoleNone && e.Leader == "" && len(e.Candidates) == 0 {
		p("  Role", "none (worker, or no election yet)")
	} else {
		p("  Role", string(e.Role))
		p("  Leader", orDash(e.Leader))
		p("  Candidates", fmt.Sprintf("%d seen, quorum %d of %d expected, stable for %d rounds",
			len(e.Candidates), e.Quorum, e.Expected, e.StableRounds))

		if len(e.Candidates) > 0 {
			p("  Peers", strings.Join(e.Candidates, ", "))
		}

		p("  Decided", ago(e.DecidedAt, now))
	}

	p("  Bootstrapped", yesNo(e.Bootstrapped))

	section("Volumes")

	if len(doc.Volumes) == 0 {
		p("  (none)", "no agent-managed volumes")
	}

	for _, v := range doc.Volumes {
		line := string(v.State)

		if v.Device != "" {
			line += " on " + v.Device
		}

		if v.Message != "" {
			line += ": " + v.Message
		}

		p("  "+v.Name, line)
	}

	if h := doc.Host; h != nil {
		section("Host")
		p("  Phase", orDash(h.Phase))
		p("  Mode", fmt.Sprintf("%s, generation %d", orDash(h.Mode), h.Generation))
		p("  Last action", orDash(h.LastAction))

		if h.AppliedGeneration > 0 {
			p("  Applied", fmt.Sprintf("generation %d in this boot", h.AppliedGeneration))
		}

		if h.Message != "" {
			p("  Message", h.Message)
		}

		p("  Last sync", ago(h.LastSync, now))
		p("  Hardware", fmt.Sprintf("%s, %d CPUs, %d MiB, %d disks", orDash(h.Architecture), h.CPUs, h.MemoryBytes>>20, h.Disks))

		if h.Error != "" {
			p("  Error", h.Error)
		}
	}

	if doc.LastError != nil {
		section("Last error")
		p("  When", ago(doc.LastError.Time, now))
		p("  Phase", orDash(string(doc.LastError.Phase)))
		p("  Error", doc.LastError.Message)
	}

	return tw.Flush()
}

func phaseLine(doc Document) string {
	if doc.Message == "" {
		return orDash(string(doc.Phase))
	}

	return string(doc.Phase) + " (" + doc.Message + ")"
}

func ago(t, now time.Time) string {
	if t.IsZero() {
		return "never"
	}

	return t.UTC().Format(time.RFC3339) + " (" + roundDuration(now.Sub(t)) + " ago)"
}

func until(t, now time.Time) string {
	d := t.Sub(now)
	if d < 0 {
		return t.UTC().Format(time.RFC3339) + " (expired " + roundDuration(-d) + " ago)"
	}

	return t.UTC().Format(time.RFC3339) + " (in " + roundDuration(d) + ")"
}

func roundDuration(d time.Duration) string {
	if d < 0 {
		d = 0
	}

	return d.Round(time.Second).String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}

	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}

	return "no"
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}

	return strings.Join(s, ",")
}
