package controller

import (
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
)

// CacheOptions is what the manager caches: only the objects meshkeeper's
// releases render, not every Deployment, ConfigMap or Secret of the
// cluster, and namespaced objects only in the components' namespace (that
// is all a Role there lets meshkeeper read, config/rbac). cmd/manager and
// the scale run (test/scale) build their managers with it.
func CacheOptions(componentsNamespace string) cache.Options {
	managedReq, err := labels.NewRequirement(meshv1.LabelComponent, selection.Exists, nil)
	if err != nil {
		panic(err) // a constant key with Exists: cannot fail
	}
	inComponents := map[string]cache.Config{componentsNamespace: {}}
	managed := cache.ByObject{Label: labels.NewSelector().Add(*managedReq), Namespaces: inComponents}
	return cache.Options{ByObject: map[client.Object]cache.ByObject{
		&appsv1.Deployment{}:  managed,
		&appsv1.DaemonSet{}:   managed,
		&appsv1.StatefulSet{}: managed,
		&corev1.ConfigMap{}:   managed,
		&corev1.Service{}:     managed,
		// Every namespace's service accounts, metadata only: SPIRE
		// registration writes an entry per service account of each
		// meshed namespace (read-only, config/rbac).
		&corev1.ServiceAccount{}:     {},
		&corev1.Pod{}:                {Namespaces: inComponents},
		&appsv1.ControllerRevision{}: {Namespaces: inComponents},
	}}
}
