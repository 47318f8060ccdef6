package crds

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/sovra-dev/sovra/internal/testutil"
)

// TestProvidersCarryTheKustomizeLabels checks the embedded manifests against
// what a clusterctl install gives: every CRD with its provider label, the
// Talos providers' CRDs with the contract labels that map Cluster API's
// v1beta1 contract to their v1alpha3, conversion declared where upstream
// declares it, and no cert-manager annotation left.
func TestProvidersCarryTheKustomizeLabels(t *testing.T) {
	providers, err := Providers()
	skipUnlessGenerated(t, err)
	if err != nil {
		t.Fatal(err)
	}
	wantModules := map[string]string{
		"cluster-api":         "sigs.k8s.io/cluster-api@v1.10.10",
		"bootstrap-talos":     "github.com/siderolabs/cluster-api-bootstrap-provider-talos@v0.6.12",
		"control-plane-talos": "github.com/siderolabs/cluster-api-control-plane-provider-talos@v0.5.13",
	}
	if len(providers) != len(wantModules) {
		t.Fatalf("got %d providers, want %d", len(providers), len(wantModules))
	}
	conversions := map[string]bool{}
	for _, p := range providers {
		if p.Module != wantModules[p.Name] {
			t.Errorf("%s comes from %s, want the pinned %s", p.Name, p.Module, wantModules[p.Name])
		}
		if len(p.CRDs) == 0 || len(p.Validating) == 0 || len(p.ManagerRules) == 0 {
			t.Errorf("%s: %d CRDs, %d validating webhook configurations, %d manager rules", p.Name, len(p.CRDs), len(p.Validating), len(p.ManagerRules))
		}
		for _, crd := range p.CRDs {
			labels := crd.GetLabels()
			if labels["cluster.x-k8s.io/provider"] != p.Name {
				t.Errorf("%s: provider label %q, want %q", crd.GetName(), labels["cluster.x-k8s.io/provider"], p.Name)
			}
			if p.Name != "cluster-api" && labels["cluster.x-k8s.io/v1beta1"] != "v1alpha3" {
				t.Errorf("%s: contract label cluster.x-k8s.io/v1beta1=%q, want v1alpha3", crd.GetName(), labels["cluster.x-k8s.io/v1beta1"])
			}
			if _, ok := crd.GetAnnotations()[certManagerAnnotation]; ok {
				t.Errorf("%s still asks cert-manager for a CA", crd.GetName())
			}
			conversions[crd.GetName()] = HasConversionWebhook(crd)
		}
	}
	for name, want := range map[string]bool{
		"clusters.cluster.x-k8s.io":                        true,
		"talosconfigs.bootstrap.cluster.x-k8s.io":          true,
		"taloscontrolplanes.controlplane.cluster.x-k8s.io": true,
		"ipaddresses.ipam.cluster.x-k8s.io":                false,
	} {
		if got, ok := conversions[name]; !ok || got != want {
			t.Errorf("%s: conversion webhook %v (present %v), want %v", name, got, ok, want)
		}
	}
	if n := len(CRDNames(providers)); n != 16 {
		t.Errorf("%d CRDs, want 13 from Cluster API, 2 from CABPT and 1 from CACPPT", n)
	}
	for _, p := range providers {
		for _, m := range p.Mutating {
			for _, w := range m.Webhooks {
				if w.ClientConfig.Service == nil || w.ClientConfig.Service.Path == nil || !strings.HasPrefix(*w.ClientConfig.Service.Path, "/") {
					t.Errorf("%s/%s: no service path to rewrite", m.Name, w.Name)
				}
			}
		}
	}
}

func TestNewer(t *testing.T) {
	for _, tc := range []struct {
		installed, ours string
		want            bool
	}{
		{"sigs.k8s.io/cluster-api@v1.11.0", "sigs.k8s.io/cluster-api@v1.10.10", true},
		{"sigs.k8s.io/cluster-api@v1.10.10", "sigs.k8s.io/cluster-api@v1.10.10", false},
		{"sigs.k8s.io/cluster-api@v1.9.0", "sigs.k8s.io/cluster-api@v1.10.10", false},
		{"other.example/module@v9.0.0", "sigs.k8s.io/cluster-api@v1.10.10", false},
		{"", "sigs.k8s.io/cluster-api@v1.10.10", false},
		{"sigs.k8s.io/cluster-api@garbage", "sigs.k8s.io/cluster-api@v1.10.10", false},
	} {
		if got := newer(tc.installed, tc.ours); got != tc.want {
			t.Errorf("newer(%q, %q) = %v, want %v", tc.installed, tc.ours, got, tc.want)
		}
	}
}

func TestPruneUnservedKeepsWhatTheDatabaseStores(t *testing.T) {
	providers, err := Providers()
	skipUnlessGenerated(t, err)
	if err != nil {
		t.Fatal(err)
	}
	var clusters *unstructured.Unstructured
	for _, p := range providers {
		for _, c := range p.CRDs {
			if c.GetName() == "clusters.cluster.x-k8s.io" {
				clusters = c
			}
		}
	}
	names := func(u *unstructured.Unstructured) []string {
		vs, _, _ := unstructured.NestedSlice(u.Object, "spec", "versions")
		var out []string
		for _, v := range vs {
			out = append(out, v.(map[string]any)["name"].(string))
		}
		return out
	}
	if got := names(clusters); !slices.Equal(got, []string{"v1alpha3", "v1alpha4", "v1beta1"}) {
		t.Fatalf("upstream Cluster versions changed: %v", got)
	}
	fresh := clusters.DeepCopy()
	if err := pruneUnserved(fresh, nil); err != nil {
		t.Fatal(err)
	}
	if got := names(fresh); !slices.Equal(got, []string{"v1beta1"}) {
		t.Errorf("fresh install keeps %v, want only the served v1beta1", got)
	}
	migrated := clusters.DeepCopy()
	if err := pruneUnserved(migrated, []string{"v1alpha4", "v1beta1"}); err != nil {
		t.Fatal(err)
	}
	if got := names(migrated); !slices.Equal(got, []string{"v1alpha4", "v1beta1"}) {
		t.Errorf("with objects stored at v1alpha4, kept %v", got)
	}
	if got := names(clusters); len(got) != 3 {
		t.Errorf("pruneUnserved changed the embedded CRD: %v", got)
	}
}

// skipUnlessGenerated skips a test that needs the generated manifests when
// they are missing, except under CI, where `make test` generates them first.
func skipUnlessGenerated(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, ErrNotGenerated) {
		if testutil.InCI() {
			t.Fatal(err)
		}
		t.Skip("manifests not generated: run `go generate ./daemon/capi/crds`")
	}
}

// TestWithoutSchemasKeepsWhatTheRegistrarNeeds: the providers the daemon
// keeps after Install have every CRD by name with its conversion settings
// (the registrar points the conversion at the leader), and no schema.
func TestWithoutSchemasKeepsWhatTheRegistrarNeeds(t *testing.T) {
	providers, err := Providers()
	skipUnlessGenerated(t, err)
	if err != nil {
		t.Fatal(err)
	}
	slim := WithoutSchemas(providers)
	if !slices.Equal(CRDNames(slim), CRDNames(providers)) {
		t.Fatalf("CRD names %v, want %v", CRDNames(slim), CRDNames(providers))
	}
	for i, p := range slim {
		if len(p.Validating) != len(providers[i].Validating) || len(p.Mutating) != len(providers[i].Mutating) {
			t.Errorf("%s lost its webhook configurations", p.Name)
		}
		for j, crd := range p.CRDs {
			full := providers[i].CRDs[j]
			if HasConversionWebhook(crd) != HasConversionWebhook(full) {
				t.Errorf("%s: conversion webhook %v, want %v", crd.GetName(), HasConversionWebhook(crd), HasConversionWebhook(full))
			}
			want, _, _ := unstructured.NestedStringSlice(full.Object, "spec", "conversion", "webhook", "conversionReviewVersions")
			got, _, _ := unstructured.NestedStringSlice(crd.Object, "spec", "conversion", "webhook", "conversionReviewVersions")
			if !slices.Equal(got, want) {
				t.Errorf("%s: conversion review versions %v, want %v", crd.GetName(), got, want)
			}
			if _, ok, _ := unstructured.NestedSlice(crd.Object, "spec", "versions"); ok {
				t.Errorf("%s still holds its versions' schemas", crd.GetName())
			}
		}
		if _, ok, _ := unstructured.NestedSlice(providers[i].CRDs[0].Object, "spec", "versions"); !ok {
			t.Errorf("%s: WithoutSchemas changed the providers it was given", p.Name)
		}
	}
}
