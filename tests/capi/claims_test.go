package capi_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

const (
	raceHosts    = 10
	raceMachines = 20
)

// TestHostClaimRace: two replicas on one PostgreSQL, twenty Machines of
// sovra's provider racing for ten accepted hosts, and the leader killed
// while they claim. In the end exactly ten machines hold a host each, no
// host is claimed twice, every claim is mirrored by its SovraMachine, and
// the other ten machines say why they wait.
func TestHostClaimRace(t *testing.T) {
	a, b := startReplicas(t)

	// The pool: ten attested nodes, each a host an operator accepted.
	var pool strings.Builder
	var names []string
	for i := range raceHosts {
		name, doc := attestedNodeYAML(i)
		names = append(names, name)
		pool.WriteString(doc)
	}
	mustApply(t, b, pool.String())
	now := time.Now().UTC().Format(time.RFC3339)
	for _, name := range names {
		status := fmt.Sprintf(`{"status":{"lastAttestationResult":"Passed","conditions":[`+
			`{"type":"Enrolled","status":"True","reason":"Activated","message":"test","lastTransitionTime":%q},`+
			`{"type":"Attested","status":"True","reason":"AttestationPassed","message":"test","lastTransitionTime":%q}]}}`, now, now)
		b.Kubectl("patch", "sovranode", name, "--subresource=status", "--type=merge", "-p", status)
		b.Kubectl("patch", "host", name, "--subresource=status", "--type=merge", "-p", `{"status":{"phase":"Pending"}}`)
	}
	waitFor(t, reconcileTimeout, "the accepted hosts to be Available", func() (bool, string) {
		out := jsonpath(b, "get", "hosts", "-o", "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}")
		return strings.Count(out, "Available") == raceHosts, out
	})

	const ns = "race"
	mustApply(t, b, raceClusterYAML(ns, "race", raceMachines))
	// Kill the leader while the machines claim.
	waitFor(t, reconcileTimeout, "the first claims", func() (bool, string) {
		n := strings.Count(jsonpath(b, "get", "hosts", "-o", "jsonpath={range .items[*]}{.spec.consumerRef.name}{\"\\n\"}{end}"), "race-")
		return n > 0, fmt.Sprintf("%d claimed", n)
	})
	a.Kill()
	killed := time.Now()

	type claim struct{ host, machine string }
	var claims []claim
	waitFor(t, 3*reconcileTimeout, "ten claims mirrored by their SovraMachines", func() (bool, string) {
		claims = claims[:0]
		for _, line := range strings.Split(jsonpath(b, "get", "hosts", "-o",
			"jsonpath={range .items[*]}{.metadata.name}={.spec.consumerRef.namespace}/{.spec.consumerRef.name}{\"\\n\"}{end}"), "\n") {
			host, m, ok := strings.Cut(line, "=")
			if ok && m != "/" {
				claims = append(claims, claim{host, m})
			}
		}
		mirrored := strings.Count(jsonpath(b, "-n", ns, "get", "sovramachines", "-o",
			"jsonpath={range .items[*]}{.status.hostRef.name}{\"\\n\"}{end}"), "ek-")
		return len(claims) == raceHosts && mirrored == raceHosts, fmt.Sprintf("%d hosts claimed, %d SovraMachines hold one", len(claims), mirrored)
	})
	t.Logf("%d machines, %d hosts: all claimed %s after the leader was killed", raceMachines, raceHosts, time.Since(killed).Round(100*time.Millisecond))

	// No machine holds two hosts; each host's claim is its machine's hostRef.
	seen := map[string]string{}
	for _, c := range claims {
		if other, dup := seen[c.machine]; dup {
			t.Fatalf("machine %s claimed hosts %s and %s", c.machine, other, c.host)
		}
		seen[c.machine] = c.host
		_, name, _ := strings.Cut(c.machine, "/")
		if got := jsonpath(b, "-n", ns, "get", "sovramachine", name, "-o", "jsonpath={.status.hostRef.name}"); got != c.host {
			t.Fatalf("host %s is claimed by %s, whose hostRef is %q", c.host, c.machine, got)
		}
		if got := jsonpath(b, "-n", ns, "get", "sovramachine", name, "-o", "jsonpath={.spec.providerID}"); got != "sovra://"+c.host {
			t.Fatalf("machine %s holds host %s but its providerID is %q", c.machine, c.host, got)
		}
	}
	// The others wait, and say so.
	var waiting []struct {
		Status struct {
			Conditions []struct{ Type, Status, Reason string } `json:"conditions"`
		} `json:"status"`
	}
	var list struct {
		Items json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal([]byte(b.Kubectl("-n", ns, "get", "sovramachines", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(list.Items, &waiting); err != nil {
		t.Fatal(err)
	}
	noHost := 0
	for _, m := range waiting {
		for _, c := range m.Status.Conditions {
			if c.Type == "HostClaimed" && c.Status == "False" && c.Reason == "NoHostAvailable" {
				noHost++
			}
		}
	}
	if noHost != raceMachines-raceHosts {
		t.Fatalf("%d SovraMachines say NoHostAvailable, want %d", noHost, raceMachines-raceHosts)
	}
}

// attestedNodeYAML is node i's SovraNode and its accepted Host, named after
// its EK hash as enrollment names them.
func attestedNodeYAML(i int) (string, string) {
	sum := sha256.Sum256([]byte(fmt.Sprintf("race-ek-%d", i)))
	ekHash := hex.EncodeToString(sum[:])
	name := "ek-" + ekHash[:32]
	uuid := fmt.Sprintf("%08x-0000-4000-8000-%012x", i+1, i+1)
	return name, strings.NewReplacer("NAME", name, "EKHASH", ekHash, "UUID", uuid).Replace(`---
apiVersion: sovra.dev/v1alpha1
kind: SovraNode
metadata:
  name: NAME
spec:
  ekHash: EKHASH
  uuid: UUID
---
apiVersion: sovra.dev/v1alpha1
kind: Host
metadata:
  name: NAME
spec:
  accepted: true
`)
}

// raceClusterYAML is a Cluster on sovra's provider and n Machines with
// their bootstrap data named, so that each claims a host at once.
func raceClusterYAML(ns, name string, n int) string {
	var b strings.Builder
	b.WriteString(strings.NewReplacer("NS", ns, "NAME", name).Replace(`apiVersion: v1
kind: Namespace
metadata:
  name: NS
---
apiVersion: cluster.x-k8s.io/v1beta1
kind: Cluster
metadata:
  name: NAME
  namespace: NS
spec:
  infrastructureRef:
    apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
    kind: SovraCluster
    name: NAME
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraCluster
metadata:
  name: NAME
  namespace: NS
spec:
  controlPlaneEndpoint:
    host: 10.0.0.10
    port: 6443
`))
	for i := range n {
		b.WriteString(strings.NewReplacer("NS", ns, "NAME", name, "__M__", fmt.Sprintf("%s-%02d", name, i)).Replace(`---
apiVersion: cluster.x-k8s.io/v1beta1
kind: Machine
metadata:
  name: __M__
  namespace: NS
  labels:
    cluster.x-k8s.io/cluster-name: NAME
spec:
  clusterName: NAME
  bootstrap:
    dataSecretName: __M__-bootstrap
  infrastructureRef:
    apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
    kind: SovraMachine
    name: __M__
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha1
kind: SovraMachine
metadata:
  name: __M__
  namespace: NS
spec: {}
`))
	}
	return b.String()
}
