// Package crds holds the CustomResourceDefinitions and webhook registrations
// of Cluster API core and the Talos bootstrap and control-plane providers, as
// built from the pinned modules by `go generate` (see gen/), and installs them
// into the daemon's API: server-side apply, idempotent, upgraded in place,
// never downgraded by an older binary.
package crds

//go:generate go run ./gen -out generated

import (
	"bufio"
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// generated is written by gen; it is git-ignored, and `make build` fills it.
//
//go:embed all:generated
var generated embed.FS

// File names inside each provider's folder, as gen writes them.
const (
	generatedDir = "generated"
	crdsFile     = "crds.yaml"
	webhooksFile = "webhooks.yaml"
	rbacFile     = "rbac.yaml"
	moduleFile   = "module"

	// managerRoleSuffix ends the name of the ClusterRole a provider's
	// manager is bound to (after kustomize's name prefix: capi-manager-role).
	managerRoleSuffix = "manager-role"

	// certManagerAnnotation asks cert-manager to inject a CA; sovrad sets the
	// CA itself, so the annotation is dropped.
	certManagerAnnotation = "cert-manager.io/inject-ca-from"
)

// ErrNotGenerated means the binary was built without running `go generate`.
var ErrNotGenerated = errors.New("the Cluster API manifests were not generated into this build: run `make build` (or go generate ./daemon/capi/crds) and rebuild")

// Provider is one provider's manifests.
type Provider struct {
	// Name is the provider's folder: cluster-api, bootstrap-talos, control-plane-talos.
	Name string
	// Module is the Go module and version the manifests come from, e.g.
	// sigs.k8s.io/cluster-api@v1.10.10.
	Module string
	// CRDs are as kustomize built them, but for cert-manager's annotation:
	// unstructured, so that server-side apply sends only upstream's fields.
	// Install points their conversion at sovrad and leaves out the versions
	// no release serves any more (see pruneUnserved).
	CRDs []*unstructured.Unstructured
	// Mutating and Validating are the upstream webhook registrations, still
	// pointing at the upstream Service: the webhooks package rewrites them.
	Mutating   []*admissionregistrationv1.MutatingWebhookConfiguration
	Validating []*admissionregistrationv1.ValidatingWebhookConfiguration
	// ManagerRules are the rules of the provider's manager ClusterRole: what
	// its controllers need in the management cluster.
	ManagerRules []rbacv1.PolicyRule
}

// Providers returns the embedded manifests, in a stable order.
func Providers() ([]Provider, error) {
	entries, err := fs.ReadDir(generated, generatedDir)
	if err != nil {
		return nil, ErrNotGenerated
	}
	var out []Provider
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		p, err := load(e.Name())
		if err != nil {
			return nil, fmt.Errorf("loading the %s manifests: %w", e.Name(), err)
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, ErrNotGenerated
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// CRDNames returns the names of every embedded CRD.
func CRDNames(providers []Provider) []string {
	var names []string
	for _, p := range providers {
		for _, c := range p.CRDs {
			names = append(names, c.GetName())
		}
	}
	return names
}

// WithoutSchemas returns providers with each CRD cut down to its name and
// its conversion settings: what the webhooks' registrar needs once Install
// has run. The CRDs' schemas are most of the manifests' size (about 2 MB of
// heap); the daemon keeps the providers for as long as it runs.
func WithoutSchemas(providers []Provider) []Provider {
	out := make([]Provider, len(providers))
	for i, p := range providers {
		p.CRDs = make([]*unstructured.Unstructured, len(providers[i].CRDs))
		for j, crd := range providers[i].CRDs {
			slim := &unstructured.Unstructured{Object: map[string]any{}}
			slim.SetAPIVersion(crd.GetAPIVersion())
			slim.SetKind(crd.GetKind())
			slim.SetName(crd.GetName())
			if conv, ok, _ := unstructured.NestedMap(crd.Object, "spec", "conversion"); ok {
				_ = unstructured.SetNestedMap(slim.Object, conv, "spec", "conversion")
			}
			p.CRDs[j] = slim
		}
		out[i] = p
	}
	return out
}

func load(name string) (Provider, error) {
	dir := path.Join(generatedDir, name)
	p := Provider{Name: name}
	module, err := generated.ReadFile(path.Join(dir, moduleFile))
	if err != nil {
		return p, err
	}
	p.Module = strings.TrimSpace(string(module))

	data, err := generated.ReadFile(path.Join(dir, crdsFile))
	if err != nil {
		return p, err
	}
	docs, err := split(data)
	if err != nil {
		return p, err
	}
	for _, doc := range docs {
		u := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(doc, &u.Object); err != nil {
			return p, fmt.Errorf("decoding %s: %w", crdsFile, err)
		}
		if u.GetKind() != "CustomResourceDefinition" {
			continue
		}
		annotations := u.GetAnnotations()
		delete(annotations, certManagerAnnotation)
		u.SetAnnotations(annotations)
		p.CRDs = append(p.CRDs, u)
	}

	if p.ManagerRules, err = loadManagerRules(path.Join(dir, rbacFile)); err != nil {
		return p, err
	}

	data, err = generated.ReadFile(path.Join(dir, webhooksFile))
	if errors.Is(err, fs.ErrNotExist) {
		return p, nil
	} else if err != nil {
		return p, err
	}
	if docs, err = split(data); err != nil {
		return p, err
	}
	for _, doc := range docs {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return p, fmt.Errorf("decoding %s: %w", webhooksFile, err)
		}
		switch meta.Kind {
		case "MutatingWebhookConfiguration":
			var m admissionregistrationv1.MutatingWebhookConfiguration
			if err := yaml.UnmarshalStrict(doc, &m); err != nil {
				return p, fmt.Errorf("decoding %s: %w", webhooksFile, err)
			}
			p.Mutating = append(p.Mutating, &m)
		case "ValidatingWebhookConfiguration":
			var v admissionregistrationv1.ValidatingWebhookConfiguration
			if err := yaml.UnmarshalStrict(doc, &v); err != nil {
				return p, fmt.Errorf("decoding %s: %w", webhooksFile, err)
			}
			p.Validating = append(p.Validating, &v)
		}
	}
	return p, nil
}

// loadManagerRules returns the rules of the manager ClusterRole in file: the
// one whose name ends in manager-role and that aggregates nothing (Cluster
// API's aggregated-manager-role only collects infrastructure providers'
// roles, and sovrad runs none).
func loadManagerRules(file string) ([]rbacv1.PolicyRule, error) {
	data, err := generated.ReadFile(file)
	if err != nil {
		return nil, err
	}
	docs, err := split(data)
	if err != nil {
		return nil, err
	}
	var rules []rbacv1.PolicyRule
	for _, doc := range docs {
		var role rbacv1.ClusterRole
		if err := yaml.UnmarshalStrict(doc, &role); err != nil {
			return nil, fmt.Errorf("decoding %s: %w", rbacFile, err)
		}
		if role.Kind == "ClusterRole" && strings.HasSuffix(role.Name, managerRoleSuffix) && role.AggregationRule == nil {
			rules = append(rules, role.Rules...)
		}
	}
	if len(rules) == 0 {
		return nil, fmt.Errorf("%s has no manager ClusterRole", file)
	}
	return rules, nil
}

// split cuts a multi-document YAML stream into its non-empty documents.
func split(data []byte) ([][]byte, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(doc)) > 0 {
			docs = append(docs, doc)
		}
	}
}

// HasConversionWebhook reports whether crd declares webhook conversion.
func HasConversionWebhook(crd *unstructured.Unstructured) bool {
	strategy, _, _ := unstructured.NestedString(crd.Object, "spec", "conversion", "strategy")
	return strategy == string(apiextensionsv1.WebhookConverter)
}
