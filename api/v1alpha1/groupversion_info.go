// Package v1alpha1 holds the meshkeeper.dev/v1alpha1 API: the Mesh a platform
// team declares and the MeshNode each node agent reports. Types, markers and
// condition constants only; no logic lives here.
//
// +kubebuilder:object:generate=true
// +groupName=meshkeeper.dev
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the group and version of every type in this package.
	GroupVersion = schema.GroupVersion{Group: "meshkeeper.dev", Version: "v1alpha1"}

	// SchemeBuilder registers the types of this package with a scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds the types of this package to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
