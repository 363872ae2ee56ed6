package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// PluginType is the plugin's binary name and its "type" in a conflist.
const PluginType = "meshkeeper-cni"

// PluginConf is the plugin's own entry in the node's conflist: what the
// plugin reads from its stdin besides the standard fields.
type PluginConf struct {
	// Socket is the agent's unix socket on the host.
	Socket string `json:"socket"`
	// Timeout bounds one ADD ("5s"): no answer by then fails the ADD.
	Timeout string `json:"timeout,omitempty"`
	// ExcludeNamespaces are never enrolled and pass through even when the
	// agent is down: kube-system and the agent's own namespace (so the
	// agent, ztunnel and the node's system pods can always start), plus
	// what the user adds.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
}

// entry is PluginConf with the type, as written into the conflist.
type entry struct {
	Type string `json:"type"`
	PluginConf
}

// Chain returns the conflist data with the plugin's entry last in
// "plugins" (it passes the previous result through, so it runs after the
// network plugins), replacing an older entry of the plugin wherever it is.
// Every other plugin entry and every other top-level field keep their
// content and order. changed is false, and data is returned as it was,
// when the entry was there already as wanted: chaining is idempotent.
// Data that is not a conflist is an error, and nothing is to be written.
func Chain(data []byte, c PluginConf) (out []byte, changed bool, err error) {
	obj, plugins, err := parseConflist(data)
	if err != nil {
		return nil, false, err
	}
	want, err := json.Marshal(entry{Type: PluginType, PluginConf: c})
	if err != nil {
		return nil, false, err
	}
	if n := len(plugins); n > 0 && isOurs(plugins[n-1]) && countOurs(plugins) == 1 && sameJSON(plugins[n-1], want) {
		return data, false, nil
	}
	kept := others(plugins)
	kept = append(kept, want)
	out, err = obj.withPlugins(kept)
	return out, true, err
}

// Unchain returns the conflist data without the plugin's entries; changed
// is false (and data unchanged) when there were none.
func Unchain(data []byte) (out []byte, changed bool, err error) {
	obj, plugins, err := parseConflist(data)
	if err != nil {
		return nil, false, err
	}
	if countOurs(plugins) == 0 {
		return data, false, nil
	}
	out, err = obj.withPlugins(others(plugins))
	return out, true, err
}

// Chained says whether data is a conflist with the plugin's entry.
func Chained(data []byte) (bool, error) {
	_, plugins, err := parseConflist(data)
	if err != nil {
		return false, err
	}
	return countOurs(plugins) > 0, nil
}

func parseConflist(data []byte) (*object, []json.RawMessage, error) {
	obj, err := parseObject(data)
	if err != nil {
		return nil, nil, fmt.Errorf("not a CNI conflist (want a JSON object): %w", err)
	}
	raw, ok := obj.vals["plugins"]
	if !ok {
		return nil, nil, errors.New(`not a CNI conflist: no "plugins" list (a single-plugin .conf file is not supported: write the network as a .conflist)`)
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(raw, &plugins); err != nil {
		return nil, nil, fmt.Errorf(`not a CNI conflist: "plugins" is not a list: %w`, err)
	}
	if len(plugins) == 0 {
		return nil, nil, errors.New(`CNI conflist with an empty "plugins" list: there is no network plugin to chain after`)
	}
	for i, p := range plugins {
		var t struct {
			Type *string `json:"type"`
		}
		if err := json.Unmarshal(p, &t); err != nil || t.Type == nil || *t.Type == "" {
			return nil, nil, fmt.Errorf(`CNI conflist: plugins[%d] is not an object with a "type"`, i)
		}
	}
	return obj, plugins, nil
}

func pluginType(p json.RawMessage) string {
	var t struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(p, &t)
	return t.Type
}

func isOurs(p json.RawMessage) bool { return pluginType(p) == PluginType }

func countOurs(ps []json.RawMessage) int {
	n := 0
	for _, p := range ps {
		if isOurs(p) {
			n++
		}
	}
	return n
}

func others(ps []json.RawMessage) []json.RawMessage {
	var out []json.RawMessage
	for _, p := range ps {
		if !isOurs(p) {
			out = append(out, p)
		}
	}
	return out
}

func sameJSON(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	ca, _ := json.Marshal(x)
	cb, _ := json.Marshal(y)
	return bytes.Equal(ca, cb)
}

// object is a JSON object with its keys in file order.
type object struct {
	keys []string
	vals map[string]json.RawMessage
}

func parseObject(data []byte) (*object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("starts with %v", tok)
	}
	o := &object{vals: map[string]json.RawMessage{}}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key := tok.(string) // object keys are always strings
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("value of %q: %w", key, err)
		}
		if _, dup := o.vals[key]; dup {
			return nil, fmt.Errorf("key %q appears twice", key)
		}
		o.keys = append(o.keys, key)
		o.vals[key] = v
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("data after the closing brace")
	}
	return o, nil
}

// withPlugins encodes the object with "plugins" replaced, keys in their
// order, indented.
func (o *object) withPlugins(plugins []json.RawMessage) ([]byte, error) {
	list, err := json.Marshal(plugins)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		if k == "plugins" {
			b.Write(list)
		} else {
			b.Write(o.vals[k])
		}
	}
	b.WriteByte('}')
	var out bytes.Buffer
	if err := json.Indent(&out, b.Bytes(), "", "  "); err != nil {
		return nil, err
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}
