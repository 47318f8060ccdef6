package identity

import (
	"fmt"
	"slices"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	flowcontrolv1 "k8s.io/api/flowcontrol/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/capi/crds"
)

const (
	// Namespace is sovrad's own namespace: the controllers' Lease and the
	// clusters' bootstrap leases live there. Ensure creates it.
	Namespace = "sovra-system"

	// managedBy labels every object Ensure writes.
	managedByLabel = "app.kubernetes.io/managed-by"
	managedBy      = "sovrad"

	// upstreamControllerRole prefixes the ClusterRoles the API server's RBAC
	// bootstrap creates for kube-controller-manager's controllers.
	upstreamControllerRole = "system:controller:"
	// capiProviderRole prefixes the ClusterRoles holding the Cluster API
	// providers' own manager rules.
	capiProviderRole = CAPI + ":"

	// flowSchemaName routes the components' requests to flowPriorityLevel,
	// where kube-controller-manager's go, instead of global-default (which
	// every authenticated user shares); flowPrecedence puts it before
	// global-default and after the API server's own schemas.
	flowSchemaName    = "sovra-components"
	flowPriorityLevel = "workload-high"
	flowPrecedence    = 800

	// The API groups of Cluster API and of its infrastructure providers.
	clusterGroup        = "cluster.x-k8s.io"
	infrastructureGroup = "infrastructure.cluster.x-k8s.io"
	controlPlaneGroup   = "controlplane.cluster.x-k8s.io"
)

// upstreamControllerRoles are the RBAC bootstrap roles of the upstream
// controllers Controllers runs: exactly what kube-controller-manager grants
// each of them.
var upstreamControllerRoles = []string{
	"generic-garbage-collector",
	"namespace-controller",
	"clusterrole-aggregation-controller",
	"service-account-controller",
	"root-ca-cert-publisher",
	"resourcequota-controller",
	"validatingadmissionpolicy-status-controller",
}

// Verb sets.
var (
	read      = []string{"get", "list", "watch"}
	readWrite = []string{"get", "list", "watch", "create", "update", "patch", "delete"}
	modify    = []string{"update", "patch"}
)

// Objects returns what Ensure writes: sovrad's namespace, and for every
// component the ClusterRoles, Roles and bindings that grant its user what it
// needs, and the flow schema of their requests. providers are the Cluster
// API providers sovrad runs (package crds); their manager roles become the
// CAPI user's, with what sovrad itself adds (the webhooks' registration, the
// bootstrap fence).
func Objects(providers []crds.Provider) ([]client.Object, error) {
	sovraCRDs, err := v1alpha1.CRDs()
	if err != nil {
		return nil, err
	}
	var sovraCRDNames []string
	for _, c := range sovraCRDs {
		sovraCRDNames = append(sovraCRDNames, c.Name)
	}
	waitCRDs := rule(apiextensionsv1.GroupName, []string{"customresourcedefinitions"}, []string{"get"}, sovraCRDNames...)
	sovraNS := rule("", []string{"namespaces"}, []string{"get"}, Namespace)
	leases := rule(coordinationv1.GroupName, []string{"leases"}, readWrite)

	objs := []client.Object{
		&corev1.Namespace{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
			ObjectMeta: metav1.ObjectMeta{Name: Namespace},
		},
		flowSchema(),
	}
	objs = append(objs, clusterRole(KMS, []rbacv1.PolicyRule{
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes"}, readWrite),
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes/status"}, modify),
		rule(v1alpha1.GroupVersion.Group, []string{"uuidclaims"}, []string{"get", "list", "watch", "create", "update"}),
		rule(v1alpha1.GroupVersion.Group, []string{"unsealledgers"}, []string{"get", "list", "watch", "create", "update", "delete"}),
		events(), waitCRDs,
	})...)
	objs = append(objs, clusterRole(NodeAPI, []rbacv1.PolicyRule{
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes"}, []string{"get", "list", "watch", "create", "update", "patch"}),
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes/status"}, modify),
		rule(v1alpha1.GroupVersion.Group, []string{"attestationnonces"}, []string{"get", "list", "create", "delete"}),
		rule(v1alpha1.GroupVersion.Group, []string{"attestationpolicies"}, read),
		rule(v1alpha1.GroupVersion.Group, []string{"uuidclaims"}, []string{"get", "list", "watch", "create", "update", "delete"}),
		events(), waitCRDs, sovraNS,
	})...)
	objs = append(objs, role(NodeAPI, []rbacv1.PolicyRule{leases})...)
	objs = append(objs, clusterRole(Shred, []rbacv1.PolicyRule{
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes"}, []string{"get", "list", "watch", "update"}),
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes/status"}, []string{"update"}),
		waitCRDs,
	})...)

	objs = append(objs, clusterRole(Controllers, []rbacv1.PolicyRule{
		// The CSR cleaner's part of the upstream certificate-controller
		// role, without the right to approve and sign.
		rule("certificates.k8s.io", []string{"certificatesigningrequests"}, []string{"get", "list", "watch", "delete"}),
		events(),
	})...)
	for _, r := range upstreamControllerRoles {
		objs = append(objs, binding(Controllers+":"+r, upstreamControllerRole+r, Controllers))
	}

	objs = append(objs, clusterRole(Hosts, []rbacv1.PolicyRule{
		rule(v1alpha1.GroupVersion.Group, []string{"hosts"}, []string{"get", "list", "watch", "create", "update"}),
		rule(v1alpha1.GroupVersion.Group, []string{"hosts/status"}, []string{"update"}),
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes"}, read),
		// A claimed host's configuration is its Machine's bootstrap data:
		// the Secret the Machine names, in the cluster's namespace.
		rule(infrastructureGroup, []string{"sovramachines"}, []string{"get"}),
		rule(clusterGroup, []string{"machines"}, []string{"get"}),
		// A control plane's agent is told how many control planes to
		// expect: its TalosControlPlane's replicas.
		rule(controlPlaneGroup, []string{"taloscontrolplanes"}, []string{"get"}),
		rule("", []string{"secrets"}, []string{"get"}),
		events(),
	})...)
	// The hosts' agent CAs are Secrets in sovrad's namespace.
	objs = append(objs, role(Hosts, []rbacv1.PolicyRule{rule("", []string{"secrets"}, []string{"get", "create"})})...)
	objs = append(objs, clusterRole(Infrastructure, []rbacv1.PolicyRule{
		rule(infrastructureGroup, []string{"sovramachines", "sovraclusters"}, []string{"get", "list", "watch", "update", "patch"}),
		rule(infrastructureGroup, []string{"sovramachines/status", "sovraclusters/status"}, modify),
		rule(clusterGroup, []string{"machines", "clusters"}, read),
		rule(v1alpha1.GroupVersion.Group, []string{"hosts"}, []string{"get", "list", "watch", "update"}),
		rule(v1alpha1.GroupVersion.Group, []string{"hosts/status"}, []string{"update"}),
		// Releasing a host replaces its record's key salt and opens a wipe
		// sealing window (package hosts, Release); records are read through
		// the provider's cache. A claim labels the host's record with the
		// machine's cluster (sovra.dev/cluster), a release removes it.
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes"}, []string{"get", "list", "watch", "update"}),
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes/status"}, []string{"update"}),
		events(),
	})...)

	capiRules, err := capiRules(providers)
	if err != nil {
		return nil, err
	}
	// The manager's cache, which Cluster API's user fills, serves the cached
	// reads of the infrastructure provider and the host pool too (package
	// capi, asComponent): Hosts and SovraNodes besides Cluster API's kinds.
	objs = append(objs, clusterRole(CAPI, append(capiRules, events(), sovraNS,
		rule(v1alpha1.GroupVersion.Group, []string{"sovranodes", "hosts"}, read)))...)
	objs = append(objs, role(CAPI, []rbacv1.PolicyRule{leases})...)
	for _, p := range providers {
		objs = append(objs, clusterRole(capiProviderRole+p.Name, p.ManagerRules, CAPI)...)
	}
	return objs, nil
}

// capiRules are the rights sovrad's part of Cluster API needs besides the
// providers' own: the registrar points the providers' webhook configurations
// and CRD conversions at the leader (patching them by name; creating them is
// a bootstrap step).
func capiRules(providers []crds.Provider) ([]rbacv1.PolicyRule, error) {
	var mutating, validating []string
	for _, p := range providers {
		for _, m := range p.Mutating {
			mutating = append(mutating, m.Name)
		}
		for _, v := range p.Validating {
			validating = append(validating, v.Name)
		}
	}
	crdNames := crds.CRDNames(providers)
	rules := []rbacv1.PolicyRule{
		rule(admissionregistrationv1.GroupName, []string{"mutatingwebhookconfigurations", "validatingwebhookconfigurations"}, read),
		rule(apiextensionsv1.GroupName, []string{"customresourcedefinitions"}, read),
	}
	for _, named := range []struct {
		group, resource string
		names           []string
	}{
		{admissionregistrationv1.GroupName, "mutatingwebhookconfigurations", mutating},
		{admissionregistrationv1.GroupName, "validatingwebhookconfigurations", validating},
		{apiextensionsv1.GroupName, "customresourcedefinitions", crdNames},
	} {
		if len(named.names) == 0 {
			continue
		}
		if slices.Contains(named.names, "") {
			return nil, fmt.Errorf("a Cluster API provider has a nameless %s", named.resource)
		}
		rules = append(rules, rule(named.group, []string{named.resource}, modify, named.names...))
	}
	return rules, nil
}

// rule allows verbs on resources of group, on the objects names when any.
func rule(group string, resources, verbs []string, names ...string) rbacv1.PolicyRule {
	return rbacv1.PolicyRule{APIGroups: []string{group}, Resources: resources, Verbs: verbs, ResourceNames: names}
}

// events is the rule kube-controller-manager's controllers record events with.
func events() rbacv1.PolicyRule {
	return rbacv1.PolicyRule{
		APIGroups: []string{"", eventsv1.GroupName},
		Resources: []string{"events"},
		Verbs:     []string{"create", "update", "patch"},
	}
}

func meta(name, namespace string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{managedByLabel: managedBy}}
}

func subject(user string) []rbacv1.Subject {
	return []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: user}}
}

// clusterRole is the ClusterRole name with rules and its binding to user
// (name when user is not given).
func clusterRole(name string, rules []rbacv1.PolicyRule, user ...string) []client.Object {
	to := name
	if len(user) > 0 {
		to = user[0]
	}
	return []client.Object{
		&rbacv1.ClusterRole{
			TypeMeta:   metav1.TypeMeta{APIVersion: rbacv1.SchemeGroupVersion.String(), Kind: "ClusterRole"},
			ObjectMeta: meta(name, ""),
			Rules:      rules,
		},
		binding(name, name, to),
	}
}

// binding binds user to the ClusterRole roleName.
func binding(name, roleName, user string) client.Object {
	return &rbacv1.ClusterRoleBinding{
		TypeMeta:   metav1.TypeMeta{APIVersion: rbacv1.SchemeGroupVersion.String(), Kind: "ClusterRoleBinding"},
		ObjectMeta: meta(name, ""),
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: roleName},
		Subjects:   subject(user),
	}
}

// role is the Role user with rules in Namespace, bound to user.
func role(user string, rules []rbacv1.PolicyRule) []client.Object {
	return []client.Object{
		&rbacv1.Role{
			TypeMeta:   metav1.TypeMeta{APIVersion: rbacv1.SchemeGroupVersion.String(), Kind: "Role"},
			ObjectMeta: meta(user, Namespace),
			Rules:      rules,
		},
		&rbacv1.RoleBinding{
			TypeMeta:   metav1.TypeMeta{APIVersion: rbacv1.SchemeGroupVersion.String(), Kind: "RoleBinding"},
			ObjectMeta: meta(user, Namespace),
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: user},
			Subjects:   subject(user),
		},
	}
}

// flowSchema gives the components' requests the priority level of
// kube-controller-manager's.
func flowSchema() client.Object {
	return &flowcontrolv1.FlowSchema{
		TypeMeta:   metav1.TypeMeta{APIVersion: flowcontrolv1.SchemeGroupVersion.String(), Kind: "FlowSchema"},
		ObjectMeta: meta(flowSchemaName, ""),
		Spec: flowcontrolv1.FlowSchemaSpec{
			PriorityLevelConfiguration: flowcontrolv1.PriorityLevelConfigurationReference{Name: flowPriorityLevel},
			MatchingPrecedence:         flowPrecedence,
			DistinguisherMethod:        &flowcontrolv1.FlowDistinguisherMethod{Type: flowcontrolv1.FlowDistinguisherMethodByUserType},
			Rules: []flowcontrolv1.PolicyRulesWithSubjects{{
				Subjects: []flowcontrolv1.Subject{{Kind: flowcontrolv1.SubjectKindGroup, Group: &flowcontrolv1.GroupSubject{Name: Group}}},
				ResourceRules: []flowcontrolv1.ResourcePolicyRule{{
					Verbs: []string{flowcontrolv1.VerbAll}, APIGroups: []string{flowcontrolv1.APIGroupAll},
					Resources: []string{flowcontrolv1.ResourceAll}, ClusterScope: true, Namespaces: []string{flowcontrolv1.NamespaceEvery},
				}},
				NonResourceRules: []flowcontrolv1.NonResourcePolicyRule{{
					Verbs: []string{flowcontrolv1.VerbAll}, NonResourceURLs: []string{flowcontrolv1.NonResourceAll},
				}},
			}},
		},
	}
}
