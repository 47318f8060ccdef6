package infra

import (
	"context"
	"fmt"

	"go.uber.org/zap"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
	"github.com/sovra-dev/sovra/daemon/membership"
)

// AnnotationClusterClaim on a SovraNode names the SovraMachine
// (namespace/name) whose claim of the node's host set the node's
// sovra.dev/cluster label: the provider removes only a label it set.
const AnnotationClusterClaim = "sovra.dev/cluster-claim"

func claimOf(namespace, name string) string { return namespace + "/" + name }

// labelConflict says why node's cluster label may not become cluster: an
// operator labelled it with another cluster ("" when it may).
func labelConflict(node *v1alpha1.SovraNode, cluster string) string {
	cur := node.Labels[membership.LabelCluster]
	if cur == "" || cur == cluster || node.Annotations[AnnotationClusterClaim] != "" {
		return ""
	}
	return fmt.Sprintf("SovraNode %s is labelled %s=%s by an operator, not cluster %s: remove the label, or release the host",
		node.Name, membership.LabelCluster, cur, cluster)
}

// labelNode puts the SovraNode of host in cluster (membership.LabelCluster,
// the Cluster's name, as the bootstrap fence names it), so that its agent
// joins the cluster's election, and records claim as the label's owner. A
// label an operator set to the same cluster is left as it is (and stays
// the operator's); one an operator set to another cluster is never
// overwritten: the conflict is returned.
func (r *MachineReconciler) labelNode(ctx context.Context, host, cluster, claim string) (conflict string, err error) {
	var node v1alpha1.SovraNode
	if err := r.APIReader.Get(ctx, client.ObjectKey{Name: host}, &node); err != nil {
		if apierrors.IsNotFound(err) {
			return "", nil // revoked: the host goes with it
		}
		return "", fmt.Errorf("reading node %s: %w", host, err)
	}
	cur, owner := node.Labels[membership.LabelCluster], node.Annotations[AnnotationClusterClaim]
	if why := labelConflict(&node, cluster); why != "" {
		return why, nil
	}
	if cur == cluster && (owner == claim || owner == "") {
		return "", nil
	}
	if node.Labels == nil {
		node.Labels = map[string]string{}
	}
	if node.Annotations == nil {
		node.Annotations = map[string]string{}
	}
	node.Labels[membership.LabelCluster], node.Annotations[AnnotationClusterClaim] = cluster, claim
	if err := r.Client.Update(ctx, &node); err != nil {
		return "", fmt.Errorf("labelling node %s with cluster %s: %w", host, cluster, err)
	}
	r.Logger.Info("node labelled with its machine's cluster: its agent joins the cluster's bootstrap election",
		zap.String("node", host), zap.String("cluster", cluster), zap.String("machine", claim))
	return "", nil
}

// unlabelNode takes the SovraNode of host out of the cluster its claim
// put it in: only when claim set the label (an operator's label, or one a
// later claim set, stays).
func (r *MachineReconciler) unlabelNode(ctx context.Context, host, claim string) error {
	var node v1alpha1.SovraNode
	if err := r.APIReader.Get(ctx, client.ObjectKey{Name: host}, &node); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("reading node %s: %w", host, err)
	}
	if node.Annotations[AnnotationClusterClaim] != claim {
		return nil
	}
	delete(node.Labels, membership.LabelCluster)
	delete(node.Annotations, AnnotationClusterClaim)
	if err := r.Client.Update(ctx, &node); err != nil {
		return fmt.Errorf("removing the cluster label of node %s: %w", host, err)
	}
	r.Logger.Info("node's cluster label removed: its host left the machine", zap.String("node", host), zap.String("machine", claim))
	return nil
}

// labelledElsewhere reports whether an operator put the SovraNode of host
// in another cluster than cluster (from the cache): a claim would wait.
func (r *MachineReconciler) labelledElsewhere(ctx context.Context, host, cluster string) bool {
	var node v1alpha1.SovraNode
	if err := r.Client.Get(ctx, client.ObjectKey{Name: host}, &node); err != nil {
		return false // the claim's own read decides
	}
	return labelConflict(&node, cluster) != ""
}
