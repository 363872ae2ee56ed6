package identity

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"

	agentv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/agent/v1"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	entryv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/entry/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// Server is the part of the SPIRE server API meshkeeper uses.
type Server interface {
	ListEntries(ctx context.Context) ([]Entry, error)
	// CreateEntries, UpdateEntries and DeleteEntries return one Result per
	// entry, in order; an error only when the call itself failed.
	CreateEntries(ctx context.Context, entries []Entry) ([]Result, error)
	UpdateEntries(ctx context.Context, entries []Entry) ([]Result, error)
	DeleteEntries(ctx context.Context, ids []string) ([]Result, error)
	// Bundle returns the trust domain's X.509 authorities as PEM.
	Bundle(ctx context.Context) (Bundle, error)
	ListAgents(ctx context.Context) ([]Agent, error)
	Close() error
}

// Result is the outcome of one entry of a batch call.
type Result struct {
	Code    codes.Code
	Message string
	// Entry is what the server holds after the call: for ALREADY_EXISTS the
	// existing entry.
	Entry Entry
	ID    string
}

// Bundle is a trust domain's trust bundle.
type Bundle struct {
	TrustDomain string
	// X509PEM holds the X.509 authorities, PEM-encoded.
	X509PEM []byte
}

// Agent is an attested SPIRE agent.
type Agent struct {
	ID        string
	Selectors []string
	Banned    bool
}

// NodeName is the node an agent attested as (k8s_psat:agent_node_name), or "".
func (a Agent) NodeName() string {
	for _, s := range a.Selectors {
		if v, ok := strings.CutPrefix(s, "k8s_psat:agent_node_name:"); ok {
			return v
		}
	}
	return ""
}

// Dial connects to a SPIRE server's API. An address "unix:///path" is the
// server's admin socket (access to the socket is the authorization); any
// other address is host:port reached over TLS with tlsConfig, which must
// present a client certificate the far end accepts (see the README's
// "Reaching the SPIRE server").
func Dial(address string, tlsConfig *tls.Config) (Server, error) {
	creds := insecure.NewCredentials()
	if !strings.HasPrefix(address, "unix:") {
		if tlsConfig == nil {
			return nil, fmt.Errorf("SPIRE server %s: TLS is required off the admin socket", address)
		}
		creds = credentials.NewTLS(tlsConfig)
	}
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, fmt.Errorf("SPIRE server %s: %w", address, err)
	}
	return &grpcServer{
		conn:    conn,
		entries: entryv1.NewEntryClient(conn),
		bundles: bundlev1.NewBundleClient(conn),
		agents:  agentv1.NewAgentClient(conn),
	}, nil
}

type grpcServer struct {
	conn    *grpc.ClientConn
	entries entryv1.EntryClient
	bundles bundlev1.BundleClient
	agents  agentv1.AgentClient
}

func (s *grpcServer) Close() error { return s.conn.Close() }

// pageSize bounds each List page and each batch call.
const pageSize = 1000

func (s *grpcServer) ListEntries(ctx context.Context) ([]Entry, error) {
	var out []Entry
	token := ""
	for {
		resp, err := s.entries.ListEntries(ctx, &entryv1.ListEntriesRequest{PageSize: pageSize, PageToken: token})
		if err != nil {
			return nil, fmt.Errorf("list entries: %w", err)
		}
		for _, e := range resp.Entries {
			out = append(out, fromProto(e))
		}
		if token = resp.NextPageToken; token == "" {
			return out, nil
		}
	}
}

func (s *grpcServer) CreateEntries(ctx context.Context, entries []Entry) ([]Result, error) {
	out := make([]Result, 0, len(entries))
	for chunk := range slices.Chunk(entries, pageSize) {
		req := &entryv1.BatchCreateEntryRequest{Entries: make([]*types.Entry, len(chunk))}
		for i, e := range chunk {
			req.Entries[i] = toProto(e)
		}
		resp, err := s.entries.BatchCreateEntry(ctx, req)
		if err != nil {
			return out, fmt.Errorf("create entries: %w", err)
		}
		for _, r := range resp.Results {
			out = append(out, result(r.Status, r.Entry, ""))
		}
	}
	return out, nil
}

func (s *grpcServer) UpdateEntries(ctx context.Context, entries []Entry) ([]Result, error) {
	out := make([]Result, 0, len(entries))
	mask := &types.EntryMask{SpiffeId: true, ParentId: true, Selectors: true, X509SvidTtl: true}
	for chunk := range slices.Chunk(entries, pageSize) {
		req := &entryv1.BatchUpdateEntryRequest{Entries: make([]*types.Entry, len(chunk)), InputMask: mask}
		for i, e := range chunk {
			req.Entries[i] = toProto(e)
		}
		resp, err := s.entries.BatchUpdateEntry(ctx, req)
		if err != nil {
			return out, fmt.Errorf("update entries: %w", err)
		}
		for _, r := range resp.Results {
			out = append(out, result(r.Status, r.Entry, ""))
		}
	}
	return out, nil
}

func (s *grpcServer) DeleteEntries(ctx context.Context, ids []string) ([]Result, error) {
	out := make([]Result, 0, len(ids))
	for chunk := range slices.Chunk(ids, pageSize) {
		resp, err := s.entries.BatchDeleteEntry(ctx, &entryv1.BatchDeleteEntryRequest{Ids: chunk})
		if err != nil {
			return out, fmt.Errorf("delete entries: %w", err)
		}
		for _, r := range resp.Results {
			out = append(out, result(r.Status, nil, r.Id))
		}
	}
	return out, nil
}

func (s *grpcServer) Bundle(ctx context.Context) (Bundle, error) {
	b, err := s.bundles.GetBundle(ctx, &bundlev1.GetBundleRequest{})
	if err != nil {
		return Bundle{}, fmt.Errorf("get bundle: %w", err)
	}
	out := Bundle{TrustDomain: b.TrustDomain}
	for _, a := range b.X509Authorities {
		out.X509PEM = append(out.X509PEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Asn1})...)
	}
	if len(out.X509PEM) == 0 {
		return out, errors.New("get bundle: the server has no X.509 authority yet")
	}
	return out, nil
}

func (s *grpcServer) ListAgents(ctx context.Context) ([]Agent, error) {
	var out []Agent
	token := ""
	for {
		resp, err := s.agents.ListAgents(ctx, &agentv1.ListAgentsRequest{PageSize: pageSize, PageToken: token})
		if err != nil {
			return nil, fmt.Errorf("list agents: %w", err)
		}
		for _, a := range resp.Agents {
			out = append(out, Agent{ID: idString(a.Id), Selectors: selectorStrings(a.Selectors), Banned: a.Banned})
		}
		if token = resp.NextPageToken; token == "" {
			return out, nil
		}
	}
}

func result(st *types.Status, e *types.Entry, id string) Result {
	r := Result{Code: codes.Unknown, ID: id}
	if st != nil {
		r.Code, r.Message = codes.Code(st.Code), st.Message
	}
	if e != nil {
		r.Entry = fromProto(e)
		if r.ID == "" {
			r.ID = r.Entry.ID
		}
	}
	return r
}

func toProto(e Entry) *types.Entry {
	out := &types.Entry{
		Id:          e.ID,
		SpiffeId:    toID(e.SPIFFEID),
		ParentId:    toID(e.ParentID),
		X509SvidTtl: e.X509TTL,
	}
	for _, s := range e.Selectors {
		t, v, _ := strings.Cut(s, ":")
		out.Selectors = append(out.Selectors, &types.Selector{Type: t, Value: v})
	}
	return out
}

func fromProto(e *types.Entry) Entry {
	return Entry{
		ID:        e.Id,
		SPIFFEID:  idString(e.SpiffeId),
		ParentID:  idString(e.ParentId),
		Selectors: selectorStrings(e.Selectors),
		X509TTL:   e.X509SvidTtl,
		Other: e.Admin || e.Downstream || len(e.DnsNames) > 0 || len(e.FederatesWith) > 0 ||
			e.Hint != "" || e.StoreSvid || e.ExpiresAt != 0 || e.JwtSvidTtl != 0,
	}
}

func toID(s string) *types.SPIFFEID {
	rest, ok := strings.CutPrefix(s, "spiffe://")
	if !ok {
		return &types.SPIFFEID{}
	}
	td, path, _ := strings.Cut(rest, "/")
	if path != "" {
		path = "/" + path
	}
	return &types.SPIFFEID{TrustDomain: td, Path: path}
}

func idString(id *types.SPIFFEID) string {
	if id == nil {
		return ""
	}
	return "spiffe://" + id.TrustDomain + id.Path
}

func selectorStrings(sel []*types.Selector) []string {
	out := make([]string, 0, len(sel))
	for _, s := range sel {
		out = append(out, s.Type+":"+s.Value)
	}
	slices.Sort(out)
	return out
}
