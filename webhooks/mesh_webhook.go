package webhooks

import (
	"context"
	"fmt"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation/field"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// ValidatePath is where the Mesh validating webhook is served.
const ValidatePath = "/validate-meshkeeper-dev-v1alpha1-mesh"

// meshGroupKind names the kind in admission errors.
var meshGroupKind = schema.GroupKind{Group: v1alpha1.GroupVersion.Group, Kind: "Mesh"}

// +kubebuilder:webhook:path=/validate-meshkeeper-dev-v1alpha1-mesh,mutating=false,failurePolicy=fail,sideEffects=None,groups=meshkeeper.dev,resources=meshes,verbs=create;update,versions=v1alpha1,name=vmesh.meshkeeper.dev,admissionReviewVersions=v1
// +kubebuilder:rbac:groups=meshkeeper.dev,resources=meshes,verbs=list
// (namespaces: get, for ValidateWaypointNamespaces, is the reconciler's grant)

// SetupWithManager registers the Mesh validating webhook (no mutating
// webhook: meshkeeper never writes spec) on the manager's webhook server.
func SetupWithManager(mgr ctrl.Manager, opts ...Option) error {
	v := &meshValidator{reader: mgr.GetAPIReader(), catalog: bundle.Default()}
	for _, o := range opts {
		o(v)
	}
	return ctrl.NewWebhookManagedBy(mgr, &v1alpha1.Mesh{}).
		WithValidator(v).
		WithValidatorCustomPath(ValidatePath).
		Complete()
}

// meshValidator validates Mesh creates and updates.
type meshValidator struct {
	// reader lists Meshes without a cache, so two quick creates cannot both
	// see an empty cluster through a stale cache.
	reader client.Reader
	// catalog resolves spec.version for the warnings that depend on the
	// bundle (SpireWarnings).
	catalog *bundle.Catalog
}

// Option configures the webhook.
type Option func(*meshValidator)

// WithCatalog makes the webhook resolve versions against this catalog (the
// manager's, e.g. from --bundles-dir) instead of the embedded one.
func WithCatalog(c *bundle.Catalog) Option {
	return func(v *meshValidator) { v.catalog = c }
}

var _ admission.Validator[*v1alpha1.Mesh] = &meshValidator{}

// ValidateCreate allows one Mesh per cluster and checks its spec.
func (v *meshValidator) ValidateCreate(ctx context.Context, mesh *v1alpha1.Mesh) (admission.Warnings, error) {
	var errs field.ErrorList
	other, err := v.otherMesh(ctx, mesh.Name)
	if err != nil {
		return nil, err
	}
	if other != nil {
		detail := fmt.Sprintf("only one Mesh per cluster: mesh/%s already exists; edit it instead of creating another", other.Name)
		if other.DeletionTimestamp != nil {
			detail = fmt.Sprintf("only one Mesh per cluster: mesh/%s is still being deleted; wait until it is gone, then create this one", other.Name)
		}
		errs = append(errs, field.Forbidden(field.NewPath("metadata", "name"), detail))
	}
	errs = append(errs, ValidateSpec(&mesh.Spec)...)
	errs = append(errs, ValidateGates(&mesh.Spec)...)
	wpWarnings, wpErrs := ValidateWaypointNamespaces(ctx, v.reader, &mesh.Spec, nil)
	errs = append(errs, wpErrs...)
	return append(SpireWarnings(&mesh.Spec, v.catalog), wpWarnings...), invalid(mesh.Name, errs)
}

// ValidateUpdate checks a changed spec, including that it does not step back
// more than one minor below the installed version. Updates that leave the
// spec alone (status, labels, finalizers, deletion) are always allowed, so an
// object that became invalid under newer rules can still be cleaned up.
func (v *meshValidator) ValidateUpdate(ctx context.Context, oldMesh, newMesh *v1alpha1.Mesh) (admission.Warnings, error) {
	if newMesh.DeletionTimestamp != nil || equality.Semantic.DeepEqual(oldMesh.Spec, newMesh.Spec) {
		return nil, nil
	}
	errs := ValidateSpec(&newMesh.Spec)
	errs = append(errs, ValidateGates(&newMesh.Spec)...)
	// With upgrade.minor: Automatic, spec.version is the oldest minor to
	// run, not what runs: a mesh that followed newer minors by itself is
	// not being downgraded when another field of its spec changes.
	followsMinors := newMesh.Spec.Upgrade.EffectiveMinor() == v1alpha1.UpgradeAutomatic &&
		oldMesh.Spec.Upgrade.EffectiveMinor() == v1alpha1.UpgradeAutomatic && newMesh.Spec.Version == oldMesh.Spec.Version
	if err := ValidateDowngrade(newMesh.Spec.Version, oldMesh.Status.Version.Installed); err != nil && !followsMinors {
		errs = append(errs, err)
	}
	if err := ValidateTrustDomainChange(&newMesh.Spec, &oldMesh.Status); err != nil {
		errs = append(errs, err)
	}
	wpWarnings, wpErrs := ValidateWaypointNamespaces(ctx, v.reader, &newMesh.Spec, &oldMesh.Spec)
	errs = append(errs, wpErrs...)
	return append(SpireWarnings(&newMesh.Spec, v.catalog), wpWarnings...), invalid(newMesh.Name, errs)
}

// ValidateDelete allows every delete.
func (v *meshValidator) ValidateDelete(context.Context, *v1alpha1.Mesh) (admission.Warnings, error) {
	return nil, nil
}

// otherMesh returns a Mesh with another name than name, if there is one.
func (v *meshValidator) otherMesh(ctx context.Context, name string) (*v1alpha1.Mesh, error) {
	var list v1alpha1.MeshList
	if err := v.reader.List(ctx, &list); err != nil {
		return nil, apierrors.NewInternalError(fmt.Errorf("list Meshes to check there is only one per cluster: %w; retry", err))
	}
	for i := range list.Items {
		if list.Items[i].Name != name {
			return &list.Items[i], nil
		}
	}
	return nil, nil
}

// invalid turns errs into the API's Invalid error, so kubectl prints each
// field; nil when errs is empty.
func invalid(name string, errs field.ErrorList) error {
	if len(errs) == 0 {
		return nil
	}
	return apierrors.NewInvalid(meshGroupKind, name, errs)
}
