package controllers

import (
	"slices"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", Names},
		{"all", Names},
		{"none", nil},
		{"cluster,machine", []string{Cluster, Machine}},
		{"all,-garbagecollector", slices.DeleteFunc(slices.Clone(Names), func(n string) bool { return n == GarbageCollector })},
		{" TalosConfig , taloscontrolplane ", []string{TalosConfig, TalosControlPlane}},
		{"all,none,cluster", []string{Cluster}},
	} {
		set, err := Parse(tc.in)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tc.in, err)
		}
		want := slices.Clone(tc.want)
		slices.Sort(want)
		if got := set.Sorted(); !slices.Equal(got, want) {
			t.Errorf("Parse(%q) = %v, want %v", tc.in, got, want)
		}
	}
}

func TestParseRejectsUnknownNames(t *testing.T) {
	_, err := Parse("cluster,kubeadm,-bogus")
	if err == nil || !strings.Contains(err.Error(), `"kubeadm"`) || !strings.Contains(err.Error(), `"-bogus"`) {
		t.Fatalf("want both unknown names reported, got %v", err)
	}
}
