package controller

import (
	"bytes"
	"context"
	"fmt"
	"maps"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/identity"
)

// SpireRelay is how the manager reaches the SPIRE server's admin API from
// its own pod: through the relay container in spire-server's pod
// (`manager spire-relay`, bundles/charts/spire-server), over mutual TLS
// (README, "Reaching the SPIRE server").
type SpireRelay struct {
	// Image runs the relay: the manager's own image.
	Image string
	// ManageCerts: meshkeeper creates, renews and owns both certificate
	// Secrets. False: the operator provides them (--spire-tls-dir and the
	// relay's Secret).
	ManageCerts bool
	// Namespace and Secret locate the manager's Secret (CA, CA key, client
	// certificate), in the manager's namespace.
	Namespace, Secret string
}

// SpireRelaySecret is the relay's Secret in the components' namespace (its
// serving certificate and the client CAs), mounted by the relay container.
const SpireRelaySecret = "spire-relay-tls"

// labelSpireRelay marks the Secrets meshkeeper made for the relay; a Secret
// of that name without it is someone else's and is never overwritten.
const labelSpireRelay = "meshkeeper.dev/spire-relay"

// SpireRelayHosts are the names the relay's serving certificate covers: the
// spire-server Service in namespace.
func SpireRelayHosts(namespace string) []string {
	return []string{
		"spire-server." + namespace + ".svc",
		"spire-server." + namespace + ".svc.cluster.local",
		"spire-server." + namespace,
	}
}

func (r *MeshReconciler) spireRelay() *SpireRelay {
	if r.SpireRelay == nil {
		return nil
	}
	return r.SpireRelay()
}

// +kubebuilder:rbac:groups="",namespace=istio-system,resources=secrets,verbs=create
// +kubebuilder:rbac:groups="",namespace=istio-system,resources=secrets,verbs=get;update;delete,resourceNames=spire-relay-tls

// ensureSpireRelayCerts makes, or renews ahead of expiry, the relay's CA and
// certificates: the manager's Secret first (the CA key is kept before
// anything trusts the CA), then the relay's. A Secret of either name that
// meshkeeper did not make is left as it is and the error says so.
func (r *MeshReconciler) ensureSpireRelayCerts(ctx context.Context, mesh *meshv1.Mesh, relay *SpireRelay) error {
	mgrKey := types.NamespacedName{Namespace: relay.Namespace, Name: relay.Secret}
	relayKey := types.NamespacedName{Namespace: r.ComponentsNamespace, Name: SpireRelaySecret}
	mgrSecret, err := r.ownRelaySecret(ctx, mgrKey)
	if err != nil {
		return err
	}
	relaySecret, err := r.ownRelaySecret(ctx, relayKey)
	if err != nil {
		return err
	}
	certs, reason, err := identity.EnsureRelayCerts(mgrSecret.Data, relaySecret.Data, SpireRelayHosts(r.ComponentsNamespace), r.now())
	if err != nil {
		return fmt.Errorf("SPIRE relay certificates: %w", err)
	}
	if reason == "" {
		return nil
	}
	for _, w := range []struct {
		s    *corev1.Secret
		data map[string][]byte
	}{{mgrSecret, certs.Manager}, {relaySecret, certs.Relay}} {
		if err := r.writeRelaySecret(ctx, w.s, w.data); err != nil {
			return err
		}
	}
	log.FromContext(ctx).Info("Wrote SPIRE relay certificates", "reason", reason,
		"managerSecret", mgrKey.String(), "relaySecret", relayKey.String())
	r.event(mesh, corev1.EventTypeNormal, "SpireRelayCertificates", "SPIRE relay certificates written to %s and %s: %s", mgrKey, relayKey, reason)
	return nil
}

// ownRelaySecret reads a relay Secret uncached (Secrets are not in the
// manager's cache): a new object to create when there is none, an error when
// the one there is not meshkeeper's.
func (r *MeshReconciler) ownRelaySecret(ctx context.Context, key types.NamespacedName) (*corev1.Secret, error) {
	s := &corev1.Secret{}
	err := r.reader().Get(ctx, key, s)
	switch {
	case apierrors.IsNotFound(err):
		return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name}}, nil
	case err != nil:
		return nil, fmt.Errorf("read SPIRE relay Secret %s: %w", key, err)
	case s.Labels[labelSpireRelay] != "true":
		return nil, fmt.Errorf("Secret %s exists and was not made by meshkeeper (no label %s=true): meshkeeper does not overwrite it; "+
			"delete or rename it so meshkeeper can write the SPIRE relay's certificates there, or provide the certificates yourself (--spire-tls-dir)", key, labelSpireRelay)
	}
	return s, nil
}

func (r *MeshReconciler) writeRelaySecret(ctx context.Context, s *corev1.Secret, data map[string][]byte) error {
	if s.ResourceVersion != "" && maps.EqualFunc(s.Data, data, bytes.Equal) {
		return nil
	}
	s.Labels = map[string]string{labelSpireRelay: "true", "app.kubernetes.io/managed-by": "meshkeeper"}
	s.Type = corev1.SecretTypeOpaque
	s.Data = data
	var err error
	if s.ResourceVersion == "" {
		err = r.Create(ctx, s)
	} else {
		err = r.Update(ctx, s)
	}
	if err != nil {
		return fmt.Errorf("write SPIRE relay Secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}

// removeSpireRelayCerts deletes meshkeeper's relay Secrets (never one it did
// not make) when the Mesh goes.
func (r *MeshReconciler) removeSpireRelayCerts(ctx context.Context) error {
	relay := r.spireRelay()
	if relay == nil || !relay.ManageCerts {
		return nil
	}
	for _, key := range []types.NamespacedName{
		{Namespace: r.ComponentsNamespace, Name: SpireRelaySecret},
		{Namespace: relay.Namespace, Name: relay.Secret},
	} {
		s, err := r.ownRelaySecret(ctx, key)
		if err != nil {
			log.FromContext(ctx).Info("Leaving a SPIRE relay Secret meshkeeper did not make", "secret", key.String())
			continue
		}
		if s.ResourceVersion == "" {
			continue
		}
		if err := r.Delete(ctx, s, client.Preconditions{UID: &s.UID}); client.IgnoreNotFound(err) != nil {
			return fmt.Errorf("delete SPIRE relay Secret %s: %w", key, err)
		}
	}
	return nil
}
