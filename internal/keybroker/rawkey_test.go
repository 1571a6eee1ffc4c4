package keybroker

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// keyRooms are the packages that may hold a TPM's raw data key: the broker,
// the sealed store that encrypts with it, the locked memory it lives in,
// the two formats that wrap it (a key protector, a key file), which only
// the broker calls, and the key service, which opens a protector's fleet
// row and seals the key to a host's one-time key (its client opens it into
// a keybroker.Key). The benchmark makes throwaway protectors of random keys
// to check what the key service releases.
var keyRooms = []string{"internal/keybroker", "internal/seal", "internal/secret", "internal/guardian", "internal/keyfile", "internal/keyservice", "cmd/vtpm-bench"}

// rawKeyFuncs take or return a raw data key.
var rawKeyFuncs = map[string]map[string]bool{
	"guardian": {"NewProtector": true, "MigrationKey": true},
	"keyfile":  {"Encrypt": true, "Decrypt": true},
	"seal":     {"Seal": true, "Unseal": true},
}

// TestNoRawDataKeyOutsideItsRoom reads every non-test Go file of the module
// and fails where a package outside keyRooms holds a raw data key: names a
// DEK field or variable, calls a function that takes or returns one, or
// hands seal.Options a Key itself (Key.OpenStore does that).
func TestNoRawDataKeyOutsideItsRoom(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root not found at %s: %v", root, err)
	}
	fset := token.NewFileSet()
	checked := 0
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			if strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" {
				return filepath.SkipDir
			}
			for _, room := range keyRooms {
				if rel == room {
					return filepath.SkipDir
				}
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		checked++
		for _, where := range rawKeyUses(f) {
			t.Errorf("%s:%d: %s holds a raw data key outside keybroker and seal", rel, fset.Position(where.pos).Line, where.what)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 20 {
		t.Fatalf("checked only %d files under %s; the walk is broken", checked, root)
	}
}

type rawKeyUse struct {
	pos  token.Pos
	what string
}

func rawKeyUses(f *ast.File) []rawKeyUse {
	var out []rawKeyUse
	imports := map[string]string{} // local name → last path element
	for _, im := range f.Imports {
		path := strings.Trim(im.Path.Value, `"`)
		name := path[strings.LastIndex(path, "/")+1:]
		local := name
		if im.Name != nil {
			local = im.Name.Name
		}
		imports[local] = name
	}
	isDEK := func(name string) bool {
		return strings.EqualFold(name, "dek") || strings.Contains(name, "DEK") || strings.HasSuffix(name, "Dek")
	}
	ast.Inspect(f, func(n ast.Node) bool {
		switch x := n.(type) {
		case *ast.Ident:
			if isDEK(x.Name) {
				out = append(out, rawKeyUse{x.Pos(), "identifier " + x.Name})
			}
		case *ast.SelectorExpr:
			if id, ok := x.X.(*ast.Ident); ok && rawKeyFuncs[imports[id.Name]][x.Sel.Name] {
				out = append(out, rawKeyUse{x.Pos(), id.Name + "." + x.Sel.Name})
			}
		case *ast.CompositeLit:
			sel, ok := x.Type.(*ast.SelectorExpr)
			if !ok || sel.Sel.Name != "Options" {
				break
			}
			if id, ok := sel.X.(*ast.Ident); !ok || imports[id.Name] != "seal" {
				break
			}
			for _, e := range x.Elts {
				if kv, ok := e.(*ast.KeyValueExpr); ok {
					if k, ok := kv.Key.(*ast.Ident); ok && k.Name == "Key" {
						out = append(out, rawKeyUse{kv.Pos(), "seal.Options{Key: …}"})
					}
				}
			}
		}
		return true
	})
	return out
}

// TestRawKeyUsesFindsThem keeps the scanner honest: each way of holding a
// raw key is found, and the broker's API is not.
func TestRawKeyUsesFindsThem(t *testing.T) {
	tests := []struct {
		name, src string
		want      int
	}{
		{"DEK field", `package p; func f(o x) { _ = o.DEK }`, 1},
		{"dek variable", `package p; func f() { dek := 1; _ = dek }`, 2},
		{"protector with a raw key", `package p; import "vtpm/internal/guardian"; var _ = guardian.NewProtector`, 1},
		{"renamed import", `package p; import g "vtpm/internal/guardian"; var _ = g.MigrationKey`, 1},
		{"key file", `package p; import "vtpm/internal/keyfile"; var _ = keyfile.Encrypt`, 1},
		{"seal with a raw key", `package p; import "vtpm/internal/seal"; var _ = seal.Options{Key: nil}`, 1},
		{"seal.Unseal", `package p; import "vtpm/internal/seal"; var _ = seal.Unseal`, 1},
		{"the broker's API", `package p; import ("vtpm/internal/keybroker"; "vtpm/internal/seal"); func f(o *keybroker.Opened) { o.Key.OpenStore("d", seal.Options{Logger: nil}); o.Key.MigrationKey(); o.Close() }`, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := parser.ParseFile(token.NewFileSet(), "x.go", tc.src, 0)
			if err != nil {
				t.Fatal(err)
			}
			if got := rawKeyUses(f); len(got) != tc.want {
				t.Errorf("found %d uses (%v), want %d", len(got), got, tc.want)
			}
		})
	}
}
