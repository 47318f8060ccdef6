// Package capi holds the end-to-end stories of Cluster API inside sovrad: the
// built daemon reconciles a Cluster with a TalosControlPlane and a
// MachineDeployment applied with the built kubectl, as a user writes them,
// against the stand-in infrastructure provider of package testinfra; the
// webhooks default and reject as upstream; deleting a Cluster leaves nothing
// behind; and two replicas on PostgreSQL hand the controllers over when the
// active one dies.
package capi
