package attestation

import (
	"context"
	"fmt"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/sovra-dev/sovra/daemon/apis/sovra/v1alpha1"
)

// crdPollInterval paces WaitForCRDs.
const crdPollInterval = 100 * time.Millisecond

// InstallCRDs creates or updates the sovra.dev CRDs; c's scheme must come
// from Scheme. The node API, the KMS and the Cluster API manager each
// install them as they start, concurrently: a write that lost the race to
// another (AlreadyExists, Conflict) is read again and retried.
func InstallCRDs(ctx context.Context, c client.Client) error {
	crds, err := v1alpha1.CRDs()
	if err != nil {
		return fmt.Errorf("installing CRDs: %w", err)
	}
	lostRace := func(err error) bool { return apierrors.IsAlreadyExists(err) || apierrors.IsConflict(err) }
	for _, crd := range crds {
		err := retry.OnError(retry.DefaultRetry, lostRace, func() error {
			var cur apiextensionsv1.CustomResourceDefinition
			err := c.Get(ctx, client.ObjectKey{Name: crd.Name}, &cur)
			switch {
			case apierrors.IsNotFound(err):
				crd.ResourceVersion = ""
				return c.Create(ctx, crd)
			case err != nil:
				return err
			}
			crd.ResourceVersion = cur.ResourceVersion
			return c.Update(ctx, crd)
		})
		if err != nil {
			return fmt.Errorf("installing CRD %s: %w", crd.Name, err)
		}
	}
	return nil
}

// WaitForCRDs waits until every sovra.dev CRD is Established and its kind
// is served by discovery, or ctx ends. Discovery serves a CRD a moment after
// it is established, and a cache created in between cannot map the kind.
func WaitForCRDs(ctx context.Context, c client.Client) error {
	crds, err := v1alpha1.CRDs()
	if err != nil {
		return fmt.Errorf("waiting for CRDs: %w", err)
	}
	for _, crd := range crds {
		for !served(ctx, c, crd) {
			select {
			case <-ctx.Done():
				return fmt.Errorf("waiting for CRD %s to be established: %w", crd.Name, ctx.Err())
			case <-time.After(crdPollInterval):
			}
		}
	}
	return nil
}

// served reports whether crd is established and c maps its kind. c's
// mapper asks discovery again for a kind it does not know.
func served(ctx context.Context, c client.Client, crd *apiextensionsv1.CustomResourceDefinition) bool {
	var cur apiextensionsv1.CustomResourceDefinition
	if err := c.Get(ctx, client.ObjectKey{Name: crd.Name}, &cur); err != nil || !established(&cur) {
		return false
	}
	gk := schema.GroupKind{Group: crd.Spec.Group, Kind: crd.Spec.Names.Kind}
	for _, v := range crd.Spec.Versions {
		if _, err := c.RESTMapper().RESTMapping(gk, v.Name); err != nil {
			return false
		}
	}
	return true
}

func established(crd *apiextensionsv1.CustomResourceDefinition) bool {
	for _, c := range crd.Status.Conditions {
		if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
			return true
		}
	}
	return false
}
