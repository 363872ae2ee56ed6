package controller

import (
	"encoding/json"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// fieldSetOf returns the metadata.labels keys in a managedFields FieldsV1
// entry ({"f:metadata":{"f:labels":{"f:key":{}}}}).
func fieldSetOf(f *metav1.FieldsV1) (map[string]struct{}, error) {
	var root struct {
		Metadata struct {
			Labels map[string]json.RawMessage `json:"f:labels"`
		} `json:"f:metadata"`
	}
	if err := json.Unmarshal(f.Raw, &root); err != nil {
		return nil, err
	}
	keys := make(map[string]struct{}, len(root.Metadata.Labels))
	for k := range root.Metadata.Labels {
		if name, ok := strings.CutPrefix(k, "f:"); ok {
			keys[name] = struct{}{}
		}
	}
	return keys, nil
}
