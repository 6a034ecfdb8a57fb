// Users and ACLs of the secured test broker (scripts/kafka/broker.sh with
// SAGA_KAFKA_SECURITY=sasl). A single-file program for Java 17+, run from source
// against the broker's own jars, with the admin's client properties:
//
//   java -cp "$LIBS_DIR/*" scripts/kafka/SecurityAdmin.java \
//        --bootstrap HOST:PORT --config ADMIN_PROPERTIES COMMAND ...
//
// broker.sh wraps it (`broker.sh users ...`, `broker.sh acls ...`), so tests
// need not know the libs dir or the admin's password.
//
// Commands:
//   users NAME=PASSWORD ...  create or update SCRAM-SHA-512 users (4096
//                            iterations); returns once each one can log in
//   acls add FILE            create the ACL bindings in FILE ("-": stdin);
//                            returns once the broker's authorizer has them all
//   acls remove FILE         delete exactly those bindings; a binding that
//                            matches nothing is an error (the others are
//                            still removed); returns once they are gone
//   acls list                print every binding, sorted, in the FILE format
//
// FILE: one binding a line, six whitespace-separated fields; blank lines and
// comments (from a '#' at the start of a line or after whitespace) are ignored:
//
//   <principal> <ALLOW|DENY> <operation> <resource-type> <pattern-type> <resource-name>
//   User:inventory ALLOW READ TOPIC LITERAL inventory.requests
//   User:order ALLOW WRITE TRANSACTIONAL_ID PREFIXED ecommerce-order-
//   User:order ALLOW IDEMPOTENT_WRITE CLUSTER LITERAL kafka-cluster
//
// Operations, resource types and pattern types are the names of Kafka's
// AclOperation, ResourceType and PatternType (LITERAL or PREFIXED); the host is
// always "*". Exit status: 0 done, 1 failed (one message a problem on stderr,
// "line N: ..." for a line of FILE), 2 bad command line.

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.function.Function;
import java.util.stream.Collectors;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DeleteAclsResult.FilterResult;
import org.apache.kafka.clients.admin.DeleteAclsResult.FilterResults;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialAlteration;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;
import org.apache.kafka.common.KafkaFuture;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.config.SaslConfigs;
import org.apache.kafka.common.errors.SaslAuthenticationException;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class SecurityAdmin {
    static final int SCRAM_ITERATIONS = 4096;
    /** How long to wait for a change to become effective on the broker. */
    static final long SETTLE_MS = 30_000;
    static final long POLL_MS = 100;

    /** An expected failure: its message is all the user sees. */
    static final class Failure extends Exception {
        final int status;

        Failure(String message) {
            this(message, 1);
        }

        Failure(String message, int status) {
            super(message);
            this.status = status;
        }
    }

    static final String USAGE = String.join("\n",
            "usage: SecurityAdmin --bootstrap HOST:PORT --config ADMIN_PROPERTIES COMMAND",
            "  users NAME=PASSWORD ...",
            "  acls add FILE | acls remove FILE | acls list      (FILE: - for stdin)");

    public static void main(String[] args) {
        int status;
        try {
            run(args);
            status = 0;
        } catch (Failure f) {
            System.err.println("SecurityAdmin: " + f.getMessage());
            status = f.status;
        } catch (Exception e) {
            System.err.println("SecurityAdmin: " + describe(e));
            status = 1;
        }
        System.out.flush();
        System.exit(status);
    }

    static void run(String[] args) throws Exception {
        String bootstrap = null;
        String config = null;
        int i = 0;
        while (i < args.length && args[i].startsWith("--")) {
            if (i + 1 >= args.length) {
                throw new Failure(args[i] + " needs a value\n" + USAGE, 2);
            }
            switch (args[i]) {
                case "--bootstrap" -> bootstrap = args[i + 1];
                case "--config" -> config = args[i + 1];
                default -> throw new Failure("unknown option " + args[i] + "\n" + USAGE, 2);
            }
            i += 2;
        }
        if (bootstrap == null || config == null || i >= args.length) {
            throw new Failure(USAGE, 2);
        }
        List<String> rest = Arrays.asList(args).subList(i, args.length);
        Properties props = clientProperties(bootstrap, config);

        switch (rest.get(0)) {
            case "users" -> {
                if (rest.size() < 2) {
                    throw new Failure("users needs at least one NAME=PASSWORD\n" + USAGE, 2);
                }
                users(props, rest.subList(1, rest.size()));
            }
            case "acls" -> {
                String sub = rest.size() > 1 ? rest.get(1) : "";
                if (sub.equals("list") && rest.size() == 2) {
                    try (Admin admin = Admin.create(props)) {
                        listAcls(admin);
                    }
                } else if ((sub.equals("add") || sub.equals("remove")) && rest.size() == 3) {
                    String file = rest.get(2);
                    Map<AclBinding, Integer> bindings = parseAcls(file);
                    if (bindings.isEmpty()) {
                        System.err.println("SecurityAdmin: no ACL bindings in " + file + "; nothing to do");
                        return;
                    }
                    try (Admin admin = Admin.create(props)) {
                        if (sub.equals("add")) {
                            addAcls(admin, bindings);
                        } else {
                            removeAcls(admin, bindings);
                        }
                    }
                } else {
                    throw new Failure("bad acls command\n" + USAGE, 2);
                }
            }
            default -> throw new Failure("unknown command '" + rest.get(0) + "'\n" + USAGE, 2);
        }
    }

    static Properties clientProperties(String bootstrap, String config) throws Failure {
        Properties props = new Properties();
        try (Reader r = Files.newBufferedReader(Path.of(config), StandardCharsets.UTF_8)) {
            props.load(r);
        } catch (NoSuchFileException e) {
            throw new Failure("no client config file " + config);
        } catch (IOException e) {
            throw new Failure("cannot read " + config + ": " + e.getMessage());
        }
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.putIfAbsent(AdminClientConfig.CLIENT_ID_CONFIG, "saga-security-admin");
        // A broker that is down or refuses us should fail the command in
        // seconds, not after the client's default minute.
        props.putIfAbsent(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "10000");
        props.putIfAbsent(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "20000");
        return props;
    }

    // --- users ----------------------------------------------------------------

    static void users(Properties adminProps, List<String> specs) throws Exception {
        Map<String, String> users = new LinkedHashMap<>();
        for (String spec : specs) {
            int eq = spec.indexOf('=');
            if (eq <= 0 || eq == spec.length() - 1) {
                throw new Failure("bad user '" + spec + "': expected NAME=PASSWORD", 2);
            }
            users.put(spec.substring(0, eq), spec.substring(eq + 1));
        }
        List<UserScramCredentialAlteration> upserts = new ArrayList<>();
        users.forEach((name, password) -> upserts.add(new UserScramCredentialUpsertion(
                name, new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS), password)));

        List<String> errors = new ArrayList<>();
        try (Admin admin = Admin.create(adminProps)) {
            Map<String, KafkaFuture<Void>> results = admin.alterUserScramCredentials(upserts).values();
            for (String name : users.keySet()) {
                try {
                    results.get(name).get();
                } catch (ExecutionException e) {
                    errors.add("user " + name + ": " + describe(e));
                }
            }
        }
        if (!errors.isEmpty()) {
            throw new Failure(String.join("\n", errors));
        }
        // The controller has the credentials; wait until the broker accepts them.
        long deadline = System.currentTimeMillis() + SETTLE_MS;
        for (Map.Entry<String, String> user : users.entrySet()) {
            awaitLogin(adminProps, user.getKey(), user.getValue(), deadline);
            System.out.println("user " + user.getKey() + ": SCRAM-SHA-512 credentials set");
        }
    }

    static void awaitLogin(Properties adminProps, String name, String password, long deadline) throws Exception {
        Properties props = new Properties();
        props.putAll(adminProps);
        props.put(SaslConfigs.SASL_MECHANISM, "SCRAM-SHA-512");
        props.put(SaslConfigs.SASL_JAAS_CONFIG, "org.apache.kafka.common.security.scram.ScramLoginModule required"
                + " username=\"" + jaasEscape(name) + "\" password=\"" + jaasEscape(password) + "\";");
        props.put(AdminClientConfig.CLIENT_ID_CONFIG, "saga-security-admin-login-check");
        while (true) {
            try (Admin admin = Admin.create(props)) {
                // DescribeCluster needs no ACL: it checks only that the login works.
                admin.describeCluster().clusterId().get(10, TimeUnit.SECONDS);
                return;
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof SaslAuthenticationException)) {
                    throw new Failure("user " + name + ": cannot check the login: " + describe(e));
                }
                if (System.currentTimeMillis() >= deadline) {
                    throw new Failure("user " + name + ": the broker still refuses the new credentials after "
                            + SETTLE_MS / 1000 + "s: " + describe(e));
                }
            }
            Thread.sleep(POLL_MS);
        }
    }

    static String jaasEscape(String s) {
        return s.replace("\\", "\\\\").replace("\"", "\\\"");
    }

    // --- ACL file ---------------------------------------------------------------

    static final String LINE_FORMAT =
            "<principal> <ALLOW|DENY> <operation> <resource-type> <pattern-type> <resource-name>";

    /** The bindings of FILE, each with the line it came from (first line if repeated). */
    static Map<AclBinding, Integer> parseAcls(String file) throws Failure {
        List<String> lines;
        try {
            if (file.equals("-")) {
                BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
                lines = in.lines().collect(Collectors.toList());
            } else {
                lines = Files.readAllLines(Path.of(file), StandardCharsets.UTF_8);
            }
        } catch (NoSuchFileException e) {
            throw new Failure("no ACL file " + file);
        } catch (IOException | java.io.UncheckedIOException e) {
            throw new Failure("cannot read " + file + ": " + e.getMessage());
        }
        Map<AclBinding, Integer> bindings = new LinkedHashMap<>();
        List<String> errors = new ArrayList<>();
        for (int n = 1; n <= lines.size(); n++) {
            String line = stripComment(lines.get(n - 1)).trim();
            if (line.isEmpty()) {
                continue;
            }
            try {
                bindings.putIfAbsent(parseBinding(line), n);
            } catch (IllegalArgumentException e) {
                errors.add("line " + n + ": " + e.getMessage());
            }
        }
        if (!errors.isEmpty()) {
            throw new Failure(file + ": nothing changed:\n" + String.join("\n", errors));
        }
        return bindings;
    }

    static String stripComment(String line) {
        for (int i = 0; i < line.length(); i++) {
            if (line.charAt(i) == '#' && (i == 0 || Character.isWhitespace(line.charAt(i - 1)))) {
                return line.substring(0, i);
            }
        }
        return line;
    }

    static AclBinding parseBinding(String line) {
        String[] f = line.split("\\s+");
        if (f.length != 6) {
            throw new IllegalArgumentException(
                    "expected 6 fields (" + LINE_FORMAT + "), found " + f.length + ": " + line);
        }
        String principal = f[0];
        int colon = principal.indexOf(':');
        if (colon <= 0 || colon == principal.length() - 1) {
            throw new IllegalArgumentException("principal '" + principal + "' is not TYPE:NAME (e.g. User:alice)");
        }
        AclPermissionType permission = enumField("permission", f[1],
                List.of(AclPermissionType.ALLOW, AclPermissionType.DENY), AclPermissionType::name);
        AclOperation operation = enumField("operation", f[2], Arrays.stream(AclOperation.values())
                .filter(o -> o != AclOperation.ANY && o != AclOperation.UNKNOWN).toList(), AclOperation::name);
        ResourceType type = enumField("resource type", f[3], Arrays.stream(ResourceType.values())
                .filter(t -> t != ResourceType.ANY && t != ResourceType.UNKNOWN).toList(), ResourceType::name);
        PatternType pattern = enumField("pattern type", f[4],
                List.of(PatternType.LITERAL, PatternType.PREFIXED), PatternType::name);
        return new AclBinding(new ResourcePattern(type, f[5], pattern),
                new AccessControlEntry(principal, "*", operation, permission));
    }

    static <T> T enumField(String what, String value, List<T> allowed, Function<T, String> name) {
        for (T t : allowed) {
            if (name.apply(t).equalsIgnoreCase(value)) {
                return t;
            }
        }
        throw new IllegalArgumentException("unknown " + what + " '" + value + "' (one of: "
                + allowed.stream().map(name).collect(Collectors.joining(", ")) + ")");
    }

    static String format(AclBinding b) {
        AccessControlEntry e = b.entry();
        ResourcePattern p = b.pattern();
        String line = String.join(" ", e.principal(), e.permissionType().name(), e.operation().name(),
                p.resourceType().name(), p.patternType().name(), p.name());
        // The file format has no host field: a binding made elsewhere with a
        // host other than "*" says so in a comment.
        return e.host().equals("*") ? line : line + " # host=" + e.host();
    }

    // --- ACL commands -----------------------------------------------------------

    static void addAcls(Admin admin, Map<AclBinding, Integer> bindings) throws Exception {
        Map<AclBinding, KafkaFuture<Void>> results = admin.createAcls(bindings.keySet()).values();
        List<String> errors = new ArrayList<>();
        for (Map.Entry<AclBinding, Integer> b : bindings.entrySet()) {
            try {
                results.get(b.getKey()).get();
            } catch (ExecutionException e) {
                errors.add("line " + b.getValue() + ": " + format(b.getKey()) + ": " + describe(e));
            }
        }
        if (!errors.isEmpty()) {
            throw new Failure(String.join("\n", errors));
        }
        // Created means committed by the controller; the broker's authorizer
        // applies it when it replays the metadata log: wait for that.
        awaitAcls(admin, bindings.keySet(), true);
        System.out.println("added " + bindings.size() + " ACL binding(s)");
    }

    static void removeAcls(Admin admin, Map<AclBinding, Integer> bindings) throws Exception {
        Map<AclBindingFilter, AclBinding> byFilter = new LinkedHashMap<>();
        for (AclBinding b : bindings.keySet()) {
            byFilter.put(b.toFilter(), b);
        }
        Map<AclBindingFilter, KafkaFuture<FilterResults>> results = admin.deleteAcls(byFilter.keySet()).values();
        List<String> errors = new ArrayList<>();
        Set<AclBinding> removed = new HashSet<>();
        for (Map.Entry<AclBindingFilter, AclBinding> f : byFilter.entrySet()) {
            AclBinding b = f.getValue();
            String where = "line " + bindings.get(b) + ": " + format(b) + ": ";
            try {
                Collection<FilterResult> matched = results.get(f.getKey()).get().values();
                if (matched.isEmpty()) {
                    errors.add(where + "no such ACL binding");
                }
                for (FilterResult r : matched) {
                    if (r.exception() != null) {
                        errors.add(where + describe(r.exception()));
                    } else {
                        removed.add(r.binding());
                    }
                }
            } catch (ExecutionException e) {
                errors.add(where + describe(e));
            }
        }
        awaitAcls(admin, removed, false);
        System.out.println("removed " + removed.size() + " ACL binding(s)");
        if (!errors.isEmpty()) {
            throw new Failure(String.join("\n", errors));
        }
    }

    /** Waits until the broker lists all of `bindings` (present) or none of them. */
    static void awaitAcls(Admin admin, Set<AclBinding> bindings, boolean present) throws Exception {
        long deadline = System.currentTimeMillis() + SETTLE_MS;
        while (true) {
            Set<AclBinding> listed = new HashSet<>(admin.describeAcls(AclBindingFilter.ANY).values().get());
            long pending = bindings.stream().filter(b -> listed.contains(b) != present).count();
            if (pending == 0) {
                return;
            }
            if (System.currentTimeMillis() >= deadline) {
                throw new Failure(pending + " ACL binding(s) still " + (present ? "missing" : "listed")
                        + " on the broker after " + SETTLE_MS / 1000 + "s");
            }
            Thread.sleep(POLL_MS);
        }
    }

    static void listAcls(Admin admin) throws Exception {
        List<String> lines = new ArrayList<>();
        for (AclBinding b : admin.describeAcls(AclBindingFilter.ANY).values().get()) {
            lines.add(format(b));
        }
        lines.sort(null);
        lines.forEach(System.out::println);
    }

    /** The message of an expected failure: the cause's type and text, no stack trace. */
    static String describe(Throwable e) {
        while ((e instanceof ExecutionException || e instanceof java.util.concurrent.CompletionException)
                && e.getCause() != null) {
            e = e.getCause();
        }
        String type = e.getClass().getSimpleName();
        String message = e.getMessage();
        if (e instanceof org.apache.kafka.common.errors.TimeoutException) {
            message = "no answer from the broker in time (is it running? is the address right?): " + message;
        }
        return message == null ? type : type + ": " + message;
    }
}
