package webhooks

import (
	"fmt"

	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// SpireWarnings are the admission warnings for spec.identity.spire: where
// the bundle spec.version resolves to cannot wire the chosen dataplane to
// SPIRE (Ambient: upstream ztunnel cannot take SPIRE identities), the Mesh
// is accepted and SPIRE issues identities only to workloads that fetch them
// from the SPIRE agent's Workload API themselves; the mesh's own mTLS keeps
// istiod's CA. The warning says so and what to do.
func SpireWarnings(spec *v1alpha1.MeshSpec, catalog *bundle.Catalog) admission.Warnings {
	s := spec.Identity.Spire
	if s == nil || !s.Enabled || catalog == nil {
		return nil
	}
	b, err := catalog.Resolve(spec.Version)
	if err != nil {
		return nil // ValidateSpec's version check and the reconciler report it
	}
	mode := spec.Dataplane.EffectiveMode()
	if b.SpireSupport[string(mode)] {
		return nil
	}
	if mode == v1alpha1.ModeAmbient {
		return admission.Warnings{fmt.Sprintf(
			"spec.identity.spire with dataplane mode Ambient: ztunnel cannot take SPIRE identities (its SPIRE support is not merged upstream, so Istio %s's ztunnel has none); "+
				"the mesh's mTLS keeps using istiod's CA and SPIRE issues identities only to workloads that fetch them from the SPIRE agent's Workload API themselves. "+
				"To have the mesh's proxies use SPIRE identities, set spec.dataplane.mode: Sidecar", b.Version)}
	}
	return admission.Warnings{fmt.Sprintf("spec.identity.spire: Istio %s cannot take SPIRE identities in %s mode; SPIRE issues identities only to workloads that use its Workload API", b.Version, mode)}
}

// ValidateTrustDomainChange refuses moving a running mesh to another trust
// domain: status.identity.trustDomain is what it runs with.
func ValidateTrustDomainChange(spec *v1alpha1.MeshSpec, status *v1alpha1.MeshStatus) *field.Error {
	st, s := status.Identity, spec.Identity.Spire
	if st == nil || st.TrustDomain == "" || s == nil || !s.Enabled || s.TrustDomain == st.TrustDomain {
		return nil
	}
	return field.Forbidden(field.NewPath("spec", "identity", "spire", "trustDomain"), fmt.Sprintf(
		"%q: the mesh runs with trust domain %q and meshkeeper never moves a running mesh to another one (every workload identity, and every policy naming them, would change at once); "+
			"set it back to %q, or delete the Mesh and create it again with the new trust domain", s.TrustDomain, st.TrustDomain, st.TrustDomain))
}
