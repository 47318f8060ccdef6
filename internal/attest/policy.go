package attest

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
)

// Mode says what a policy finding does.
type Mode string

// Modes of a rule.
const (
	// Enforce fails the attestation.
	Enforce Mode = "Enforce"
	// Warn records the finding and lets the attestation pass.
	Warn Mode = "Warn"
)

// PCRRule requires PCR Index to hold one of Values (SHA-256 digests).
type PCRRule struct {
	Index  int
	Values [][]byte
	Mode   Mode
}

// ClaimRule requires claim Name to be readable and equal one of Values. An
// empty Values only requires the claim to be present and readable.
type ClaimRule struct {
	Name   string
	Values []string
	Mode   Mode
}

// Policy is an attestation policy in the form the verifier evaluates; the
// daemon builds it from the AttestationPolicy resources matching a node.
type Policy struct {
	// Name identifies the source of the rules in findings.
	Name   string
	PCRs   []PCRRule
	Claims []ClaimRule
}

// Finding is one rule a node's evidence broke.
type Finding struct {
	Policy string
	Mode   Mode
	// Rule names the PCR or claim, e.g. "pcr[7]" or "claim secureboot".
	Rule    string
	Message string
}

func (f Finding) String() string {
	return fmt.Sprintf("%s %s: %s (%s)", f.Policy, f.Rule, f.Message, f.Mode)
}

// Outcome is the result of evaluating policies.
type Outcome struct {
	Findings []Finding
}

// Passed reports whether no Enforce rule was broken.
func (o Outcome) Passed() bool {
	return !slices.ContainsFunc(o.Findings, func(f Finding) bool { return f.Mode != Warn })
}

// Of returns the findings of one mode as strings.
func (o Outcome) Of(m Mode) []string {
	var out []string
	for _, f := range o.Findings {
		if (m == Warn) == (f.Mode == Warn) {
			out = append(out, f.String())
		}
	}
	return out
}

// Evaluate checks verified evidence against every policy. A rule with a mode
// other than Warn is enforced.
func Evaluate(v *Verified, policies ...Policy) Outcome {
	var out Outcome
	for _, p := range policies {
		for _, r := range p.PCRs {
			got, ok := v.PCRs[r.Index]
			switch {
			case !ok:
				out.add(p.Name, r.Mode, fmt.Sprintf("pcr[%d]", r.Index), "PCR was not quoted")
			case !slices.ContainsFunc(r.Values, func(w []byte) bool { return bytes.Equal(w, got) }):
				out.add(p.Name, r.Mode, fmt.Sprintf("pcr[%d]", r.Index), fmt.Sprintf("value %s is not allowed", hex.EncodeToString(got)))
			}
		}
		for _, r := range p.Claims {
			c, ok := v.Claims[r.Name]
			rule := "claim " + r.Name
			switch {
			case !ok:
				out.add(p.Name, r.Mode, rule, "claim is missing")
			case c.Err != "":
				out.add(p.Name, r.Mode, rule, "claim could not be read: "+c.Err)
			case len(r.Values) > 0 && !slices.Contains(r.Values, c.Value):
				out.add(p.Name, r.Mode, rule, fmt.Sprintf("value %q is not one of %s", c.Value, strings.Join(r.Values, ", ")))
			}
		}
	}
	return out
}

func (o *Outcome) add(policy string, m Mode, rule, msg string) {
	if m != Warn {
		m = Enforce
	}
	o.Findings = append(o.Findings, Finding{Policy: policy, Mode: m, Rule: rule, Message: msg})
}
