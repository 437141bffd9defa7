CREATE TABLE departments (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  location TEXT NOT NULL,
  budget INTEGER NOT NULL
);

CREATE TABLE employees (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  title TEXT NOT NULL,
  salary INTEGER NOT NULL,
  hire_date TEXT NOT NULL, -- YYYY-MM-DD
  department_id INTEGER NOT NULL REFERENCES departments(id),
  manager_id INTEGER REFERENCES employees(id)
);

CREATE TABLE projects (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL, -- 'planned', 'active' or 'completed'
  budget INTEGER NOT NULL,
  start_date TEXT NOT NULL, -- YYYY-MM-DD
  department_id INTEGER NOT NULL REFERENCES departments(id)
);

CREATE TABLE assignments (
  employee_id INTEGER NOT NULL REFERENCES employees(id),
  project_id INTEGER NOT NULL REFERENCES projects(id),
  role TEXT NOT NULL, -- 'Lead', 'Developer', 'Analyst' or 'Reviewer'
  hours INTEGER NOT NULL,
  PRIMARY KEY (employee_id, project_id)
);

-- Seed data (not part of the prompt).
INSERT INTO departments (id, name, location, budget) VALUES
  (1, 'Engineering', 'Berlin', 1200000),
  (2, 'Sales', 'London', 650000),
  (3, 'Marketing', 'London', 480000),
  (4, 'Finance', 'Paris', 390000),
  (5, 'Human Resources', 'Berlin', 260000),
  (6, 'Support', 'Madrid', 310000);

INSERT INTO employees (id, name, title, salary, hire_date, department_id, manager_id) VALUES
  (1, 'Alice Martin', 'Engineering Manager', 142000, '2014-03-17', 1, NULL),
  (2, 'Bruno Keller', 'Senior Engineer', 118000, '2016-07-01', 1, 1),
  (3, 'Chloe Dubois', 'Software Engineer', 96000, '2019-02-11', 1, 1),
  (4, 'Daniel Ortiz', 'Software Engineer', 91000, '2020-09-14', 1, 2),
  (5, 'Elena Rossi', 'Data Engineer', 104000, '2018-05-22', 1, 1),
  (6, 'Farid Haddad', 'Software Engineer', 88000, '2022-01-10', 1, 2),
  (7, 'Grace Lee', 'Senior Engineer', 121000, '2015-11-30', 1, 1),
  (8, 'Hugo Lambert', 'Junior Engineer', 67000, '2023-06-05', 1, 7),
  (9, 'Ines Moreau', 'Sales Director', 135000, '2013-08-19', 2, NULL),
  (10, 'Jonas Weber', 'Account Executive', 78000, '2017-04-03', 2, 9),
  (11, 'Karin Olsen', 'Account Executive', 82000, '2016-10-24', 2, 9),
  (12, 'Liam Walsh', 'Sales Associate', 54000, '2021-03-08', 2, 10),
  (13, 'Maya Patel', 'Sales Associate', 57000, '2022-08-29', 2, 11),
  (14, 'Nora Schmidt', 'Marketing Manager', 112000, '2015-01-12', 3, NULL),
  (15, 'Oscar Lindqvist', 'Content Strategist', 71000, '2019-09-02', 3, 14),
  (16, 'Paula Ferreira', 'Designer', 69000, '2020-05-18', 3, 14),
  (17, 'Quentin Blanc', 'Marketing Analyst', 74000, '2021-11-15', 3, 14),
  (18, 'Rita Novak', 'Finance Manager', 125000, '2012-06-25', 4, NULL),
  (19, 'Samuel Cohen', 'Accountant', 76000, '2018-02-05', 4, 18),
  (20, 'Tara Nguyen', 'Financial Analyst', 83000, '2019-12-09', 4, 18),
  (21, 'Umar Shah', 'Accountant', 72000, '2023-01-16', 4, 18),
  (22, 'Vera Ivanova', 'HR Manager', 98000, '2014-09-08', 5, NULL),
  (23, 'William Brown', 'Recruiter', 61000, '2020-02-24', 5, 22),
  (24, 'Xenia Popescu', 'HR Specialist', 64000, '2021-07-19', 5, 22),
  (25, 'Yusuf Demir', 'Support Lead', 79000, '2016-04-11', 6, NULL),
  (26, 'Zoe Clarke', 'Support Agent', 48000, '2022-03-21', 6, 25),
  (27, 'Adam Novak', 'Support Agent', 46000, '2023-09-04', 6, 25),
  (28, 'Bianca Costa', 'Support Agent', 51000, '2020-10-12', 6, 25),
  (29, 'Carlos Mendes', 'Data Engineer', 99000, '2021-05-03', 1, 5),
  (30, 'Diana Volkova', 'Account Executive', 86000, '2018-11-26', 2, 9);

INSERT INTO projects (id, name, status, budget, start_date, department_id) VALUES
  (1, 'Atlas', 'active', 420000, '2023-02-01', 1),
  (2, 'Beacon', 'completed', 180000, '2021-06-15', 1),
  (3, 'Comet', 'planned', 250000, '2025-01-06', 1),
  (4, 'Delta', 'active', 95000, '2024-03-11', 2),
  (5, 'Echo', 'completed', 60000, '2022-09-01', 3),
  (6, 'Falcon', 'active', 130000, '2024-01-15', 3),
  (7, 'Granite', 'active', 75000, '2023-10-02', 4),
  (8, 'Harbor', 'planned', 40000, '2025-03-03', 5),
  (9, 'Ion', 'active', 55000, '2024-06-17', 6),
  (10, 'Juniper', 'completed', 210000, '2022-01-10', 1);

INSERT INTO assignments (employee_id, project_id, role, hours) VALUES
  (1, 1, 'Lead', 120), (2, 1, 'Developer', 640), (3, 1, 'Developer', 580),
  (5, 1, 'Developer', 410), (7, 2, 'Lead', 300), (4, 2, 'Developer', 520),
  (6, 2, 'Developer', 460), (2, 10, 'Lead', 350), (5, 10, 'Developer', 390),
  (29, 10, 'Developer', 310), (8, 3, 'Developer', 40), (7, 3, 'Lead', 60),
  (9, 4, 'Lead', 90), (10, 4, 'Analyst', 220), (11, 4, 'Analyst', 240),
  (30, 4, 'Analyst', 200), (3, 4, 'Developer', 150), (14, 5, 'Lead', 80),
  (15, 5, 'Analyst', 190), (16, 5, 'Developer', 210), (14, 6, 'Lead', 110),
  (17, 6, 'Analyst', 260), (16, 6, 'Developer', 230), (5, 6, 'Reviewer', 40),
  (18, 7, 'Lead', 70), (20, 7, 'Analyst', 280), (19, 7, 'Reviewer', 120),
  (29, 7, 'Developer', 180), (22, 8, 'Lead', 30), (24, 8, 'Analyst', 45),
  (25, 9, 'Lead', 100), (26, 9, 'Developer', 170), (28, 9, 'Developer', 150),
  (4, 9, 'Reviewer', 60), (20, 1, 'Reviewer', 50);
