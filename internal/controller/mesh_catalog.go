package controller

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/meshkeeper/meshkeeper/api/v1alpha1"
	"github.com/meshkeeper/meshkeeper/internal/bundle"
)

// catalogStatus is status.catalog: where each bundle came from and what is
// known about the catalog source.
func catalogStatus(cat *bundle.Catalog, st bundle.SourceState) *meshv1.CatalogStatus {
	out := &meshv1.CatalogStatus{Source: st.Source, Digest: st.Digest, Message: st.Message}
	if !st.LastChecked.IsZero() {
		out.LastCheckedAt = &metav1.Time{Time: st.LastChecked}
	}
	if !st.LastUpdated.IsZero() {
		out.LastUpdatedAt = &metav1.Time{Time: st.LastUpdated}
	}
	for _, b := range cat.Bundles() {
		out.Bundles = append(out.Bundles, meshv1.CatalogBundle{Version: b.Version, From: b.Source})
	}
	return out
}

// targetSource is where the target's bundle came from, for messages.
func (o *observation) targetSource() string {
	if o.catalog != nil {
		for _, b := range o.catalog.Bundles {
			if b.Version == o.target {
				return b.From
			}
		}
	}
	return bundle.SourceEmbedded
}
