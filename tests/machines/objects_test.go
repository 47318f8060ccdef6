package machines

import (
	"encoding/base64"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/types"
)

// The parts of the objects the story reads with kubectl.

type objectMeta struct {
	Name            string            `json:"name"`
	Namespace       string            `json:"namespace"`
	UID             types.UID         `json:"uid"`
	Labels          map[string]string `json:"labels"`
	ResourceVersion string            `json:"resourceVersion"`
	OwnerReferences []struct {
		Kind string `json:"kind"`
		Name string `json:"name"`
	} `json:"ownerReferences"`
}

type sovraNode struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		UUID      string   `json:"uuid"`
		Addresses []string `json:"addresses"`
	} `json:"spec"`
	Status struct {
		LastAttestationResult string      `json:"lastAttestationResult"`
		LastAttestationTime   string      `json:"lastAttestationTime"`
		Reason                string      `json:"reason"`
		Message               string      `json:"message"`
		Conditions            []condition `json:"conditions"`
		Boots                 []struct {
			ID     string `json:"id"`
			Result string `json:"result"`
		} `json:"boots"`
		KeySalt []byte `json:"keySalt"`
		Sealing *struct {
			Window *struct {
				Reason  string `json:"reason"`
				Opened  string `json:"opened"`
				Expires string `json:"expires"`
			} `json:"window"`
			LastSealed string `json:"lastSealed"`
		} `json:"sealing"`
	} `json:"status"`
}

// sealing summarises the record's sealing state, for comparisons.
func (n sovraNode) sealing() string {
	if n.Status.Sealing == nil {
		return "none"
	}

	return fmt.Sprintf("%+v last %s", n.Status.Sealing.Window, n.Status.Sealing.LastSealed)
}

// currentBoot is the boot the record's node last reported.
func (n sovraNode) currentBoot() string {
	if len(n.Status.Boots) == 0 {
		return ""
	}

	return n.Status.Boots[0].ID
}

type host struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		Accepted    bool `json:"accepted"`
		ConsumerRef *struct {
			Namespace string    `json:"namespace"`
			Name      string    `json:"name"`
			UID       types.UID `json:"uid"`
		} `json:"consumerRef"`
	} `json:"spec"`
	Status struct {
		Phase              string   `json:"phase"`
		UUID               string   `json:"uuid"`
		Addresses          []string `json:"addresses"`
		Cluster            string   `json:"cluster"`
		Machine            string   `json:"machine"`
		Mode               string   `json:"mode"`
		Boot               string   `json:"boot"`
		ReleasedGeneration int64    `json:"releasedGeneration"`
		RunningGeneration  int64    `json:"runningGeneration"`
		ConfigHash         string   `json:"configHash"`
		Hardware           *struct {
			CPUs      int32 `json:"cpus"`
			MemoryMiB int64 `json:"memoryMiB"`
		} `json:"hardware"`
		Conditions []condition `json:"conditions"`
	} `json:"status"`
}

func (h host) condition(typ string) condition { return conditionOf(h.Status.Conditions, typ) }

type sovraMachine struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		ProviderID string `json:"providerID"`
	} `json:"spec"`
	Status struct {
		Ready     bool `json:"ready"`
		Addresses []struct {
			Type    string `json:"type"`
			Address string `json:"address"`
		} `json:"addresses"`
		HostRef *struct {
			Name string `json:"name"`
		} `json:"hostRef"`
		FailureReason *string     `json:"failureReason"`
		Conditions    []condition `json:"conditions"`
	} `json:"status"`
}

func (m sovraMachine) condition(typ string) condition { return conditionOf(m.Status.Conditions, typ) }

type capiMachine struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		Bootstrap struct {
			DataSecretName *string `json:"dataSecretName"`
		} `json:"bootstrap"`
		InfrastructureRef struct {
			Name string `json:"name"`
		} `json:"infrastructureRef"`
		ProviderID string `json:"providerID"`
	} `json:"spec"`
	Status struct {
		Phase string `json:"phase"`
	} `json:"status"`
}

func (d *daemon) nodes(t testing.TB) []sovraNode {
	t.Helper()

	var list struct{ Items []sovraNode }
	d.get(t, &list, "sovranodes")

	return list.Items
}

func (d *daemon) hosts(t testing.TB) []host {
	t.Helper()

	var list struct{ Items []host }
	d.get(t, &list, "hosts.sovra.dev")

	return list.Items
}

func (d *daemon) hostByName(t testing.TB, name string) host {
	t.Helper()

	var h host
	d.get(t, &h, "host", name)

	return h
}

func (d *daemon) hostByUUID(t testing.TB, uuid string) (host, bool) {
	t.Helper()

	for _, h := range d.hosts(t) {
		if h.Status.UUID == uuid {
			return h, true
		}
	}

	return host{}, false
}

func (d *daemon) nodeByName(t testing.TB, name string) sovraNode {
	t.Helper()

	var n sovraNode
	d.get(t, &n, "sovranode", name)

	return n
}

func (d *daemon) sovraMachines(t testing.TB, ns string) []sovraMachine {
	t.Helper()

	var list struct{ Items []sovraMachine }
	d.get(t, &list, "-n", ns, "sovramachines")

	return list.Items
}

func (d *daemon) capiMachines(t testing.TB, ns string) []capiMachine {
	t.Helper()

	var list struct{ Items []capiMachine }
	d.get(t, &list, "-n", ns, "machines.cluster.x-k8s.io")

	return list.Items
}

// bootstrapData is the bootstrap data Secret of a Machine.
func (d *daemon) bootstrapData(t testing.TB, ns string, m capiMachine) []byte {
	t.Helper()

	if m.Spec.Bootstrap.DataSecretName == nil {
		t.Fatalf("machine %s has no bootstrap data", m.Metadata.Name)
	}

	enc := d.Kubectl("-n", ns, "get", "secret", *m.Spec.Bootstrap.DataSecretName, "-o", "jsonpath={.data.value}")

	b, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		t.Fatal(err)
	}

	return b
}

// phases summarises hosts as "uuid-prefix=phase" for failure messages.
func phases(hs []host) string {
	var out []string
	for _, h := range hs {
		out = append(out, fmt.Sprintf("%.8s=%s(gen %d/%d)", h.Status.UUID, h.Status.Phase, h.Status.RunningGeneration, h.Status.ReleasedGeneration))
	}

	sort.Strings(out)

	return strings.Join(out, " ")
}

func distinct(names []string) bool {
	s := slices.Clone(names)
	slices.Sort(s)

	return len(slices.Compact(s)) == len(names)
}
